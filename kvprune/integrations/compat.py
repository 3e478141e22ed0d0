"""What differs between the supported transformers releases, in one place.

transformers 5.24 renamed the cache argument of every model forward and output field from
``past_key_values`` to ``cache`` (the old name still works in calls, with a FutureWarning, but a
replaced forward receives the new one). kvprune passes and reads it under whichever name the
installed release uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers.modeling_outputs import BaseModelOutputWithPast

#: the keyword under which model forwards take (and outputs carry) the cache
CACHE_KWARG: str = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
)


def with_cache(cache: Any) -> dict[str, Any]:
    """``{CACHE_KWARG: cache}``, to pass a cache to a model, layer or ``generate`` call."""
    return {CACHE_KWARG: cache}


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the cache from a forward's ``kwargs``, under either name (None if absent)."""
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def base_output(last_hidden_state: Any, cache: Any) -> BaseModelOutputWithPast:
    """A decoder stack's output carrying ``cache`` under this release's field name."""
    return BaseModelOutputWithPast(last_hidden_state=last_hidden_state, **with_cache(cache))
