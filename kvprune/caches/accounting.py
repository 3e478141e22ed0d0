"""Memory accounting: the bytes of every tensor a cache reaches, each storage counted once.

``stats()`` reports K/V bytes and, as metadata, everything else the cache keeps alive (positions,
scores, validity, per-token and per-head state, counters, free buffer room), so the two add up to
what the cache really holds, not to a hand-kept list that drifts as the caches change.
"""

from __future__ import annotations

import types
from typing import Any

import torch

_LEAVES = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Size)
_SKIP = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, torch.nn.Module)


def held_bytes(root: Any) -> int:
    """Sum of the storage sizes of every tensor reachable from ``root`` through attributes and containers
    (views share their storage: counted once, at its full size, free room included). Models are not followed."""
    seen: set[int] = set()
    storages: dict[tuple[str, int], int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _LEAVES) or isinstance(obj, _SKIP):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            if st.nbytes():
                storages[(str(obj.device), st.data_ptr())] = st.nbytes()
            extra = getattr(obj, "__dict__", None)  # attributes a tensor carries (the layer it belongs to)
            if extra:
                stack.extend(extra.values())
            continue
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        else:
            attrs = getattr(obj, "__dict__", None)
            if attrs is not None:
                stack.extend(attrs.values())
            for name in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, name):
                    stack.append(getattr(obj, name))
    return sum(storages.values())
