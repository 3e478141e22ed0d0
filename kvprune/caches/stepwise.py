"""What the caches driven by a step-by-step forward (LazyLLM, SpAtten) share with transformers' contract.

Their length is the number of tokens seen; per-token state lives in ``[B, T, ...]`` tensors named in
``ROW_STATE`` that follow the batch through beam search; they cannot be rolled back or compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..errors import CacheUsageError
from .base import KVCache, KVLayer, check_row_index, grown, room


def append_along(owner: Any, name: str, new: torch.Tensor, dim: int) -> None:
    """``owner.<name> = cat([owner.<name>, new], dim)``, amortised: the attribute is a view of a buffer with
    free room, and while it is still that view (nothing replaced it) appending writes into the room."""
    bufs: dict[str, tuple[torch.Tensor, torch.Tensor]] = owner.__dict__.setdefault("_grown", {})
    cur = getattr(owner, name)
    n, q = (0 if cur is None else cur.shape[dim]), new.shape[dim]
    buf, view = bufs.get(name, (None, None))
    if cur is None or view is not cur or n + q > buf.shape[dim]:
        buf = grown(new if cur is None else cur, n, room(n + q), dim)
    buf.narrow(dim, n, q).copy_(new)
    view = buf.narrow(dim, 0, n + q)
    bufs[name] = (buf, view)
    setattr(owner, name, view)


def free_room_bytes(owner: Any) -> int:
    """Bytes reserved by :func:`append_along` beyond what ``owner``'s attributes hold."""
    grown = owner.__dict__.get("_grown", {})
    return sum(buf.nbytes - view.nbytes for name, (buf, view) in grown.items() if getattr(owner, name) is view)


def release_stale(owner: Any) -> None:
    """Forget the buffers of attributes that were replaced since their last append (a reorder, a compaction),
    so they are freed now instead of living until the next append."""
    grown = owner.__dict__.get("_grown", {})
    for name in [n for n, (_, view) in grown.items() if getattr(owner, n) is not view]:
        del grown[name]


class StepwiseLayer(KVLayer):
    """What LazyLLM's and SpAtten's layers share: ``[B, N]`` slot positions and validity, compaction, masks sized
    by kvprune."""

    METHOD: ClassVar[str] = "stepwise"
    ROLLBACK: ClassVar[str] = "what it pruned was never kept"

    # slots are [B, N] with ``positions`` and ``valid``; K/V are [B, H, N, ...]
    positions: torch.Tensor
    valid: torch.Tensor

    def compact(self) -> None:
        """Drop empty slots once they are over a quarter of the layer (rows hold different counts)."""
        width = int(self.valid.sum(-1).max())
        if self.valid.shape[1] - width <= self.valid.shape[1] // 4:
            return
        order = (~self.valid).to(torch.int8).sort(dim=-1, stable=True).indices[:, :width]
        self.positions = self.positions.gather(1, order)
        self.valid = self.valid.gather(1, order)
        self.take_slots(order)
        release_stale(self)

    def fold_row(self, rows: torch.Tensor) -> bool:
        """The decode row goes to ``finish`` as an observation (the attention contract)."""
        return False

    def take_slots(self, order: torch.Tensor) -> None:
        """Keep the K/V slots ``order [B, N']`` (per row), in that order."""
        raise NotImplementedError

    @staticmethod
    def gather_slots(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """``t[b, h, order[b, n], ...]`` for a ``[B, H, N, ...]`` tensor."""
        idx = order[:, None, :].expand(-1, t.shape[1], -1)
        idx = idx.reshape(*idx.shape, *([1] * (t.dim() - 3))).expand(*idx.shape, *t.shape[3:])
        return t.gather(2, idx)

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return q, 0

    def kept(self) -> torch.Tensor:
        """Valid slots per row, the same for each KV head: ``[B, Hkv]``."""
        return self.valid.sum(-1, keepdim=True).expand(-1, self.keys.shape[1])


class StepwiseCache(KVCache):
    """Base of :class:`~kvprune.caches.lazy.LazyCache` and :class:`~kvprune.caches.spatten.SpAttenCache`."""

    #: per-row state tensors (batch first) reordered with the layers by beam search
    ROW_STATE: ClassVar[tuple[str, ...]] = ()
    n_seen: int
    token_valid: torch.Tensor | None
    #: True while kvprune's step forward runs; an update from any other forward is refused
    driven: bool = False
    #: the method's step through the decoder stack, ``(base, cache, input_ids, attention_mask, position_ids,
    #: inputs_embeds) -> model output``; set by the method's factory in ``kvprune.integrations``
    step_forward: Callable[..., Any] | None = None
    #: attention a layer computes itself (:data:`kvprune.caches.contract.OwnAttention`), which kvprune's attention
    #: function delegates to through the layer's ``own_attention`` (SpAtten); None: the shared attention path
    layer_attention: Callable[..., torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if not self.driven:
            raise CacheUsageError(
                f"this {type(self).__name__} was handed to a forward that kvprune does not drive: build it with "
                "kvprune.make_cache(model, ...) on the model you run it with (nothing was stored)"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def append_state(self, new: dict[str, torch.Tensor]) -> None:
        """Append the new tokens' state along the token dimension (dim 1)."""
        for name, value in new.items():
            append_along(self, name, value, dim=1)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.n_seen

    def get_mask_sizes(self, query_length: int | torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return self.n_seen + q, 0

    def _select_rows(self, index: torch.Tensor) -> None:
        if self.token_valid is not None:
            index = check_row_index(index, self.token_valid.shape[0])
        for layer in self.layers:
            layer.select_rows(index)
            release_stale(layer)
        if self.token_valid is not None:
            index = index.to(self.token_valid.device)
            for name in self.ROW_STATE:
                setattr(self, name, getattr(self, name).index_select(0, index))
            release_stale(self)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.token_valid is not None:
            self._select_rows(torch.arange(self.token_valid.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(torch.as_tensor(indices))
