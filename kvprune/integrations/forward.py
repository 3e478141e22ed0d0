"""One wrapper on the decoder stack's forward that hands LazyLLM and SpAtten caches to their own step.

Any other cache (or none) runs the model's original forward untouched.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from ..caches.lazy import LazyCache
from ..caches.spatten import SpAttenCache
from .compat import pop_cache, with_cache


def prepare_stepwise(model: torch.nn.Module) -> torch.nn.Module:
    """Wrap ``model.model.forward`` once (idempotent): LazyCache -> lazy_forward, SpAttenCache -> spatten_forward."""
    from .lazyllm import lazy_forward
    from .spatten import spatten_forward

    base = model.model
    if getattr(base, "_kvprune_stepwise", False):
        return model
    original = base.forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs: Any):
        cache = pop_cache(kwargs)  # ``cache`` from transformers 5.24 on, ``past_key_values`` before
        if isinstance(cache, (LazyCache, SpAttenCache)):
            step = lazy_forward if isinstance(cache, LazyCache) else spatten_forward
            cache.driven = True  # the cache refuses updates from any other forward
            try:
                return step(self, cache, input_ids, attention_mask, position_ids, inputs_embeds)
            finally:
                cache.driven = False
        return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        inputs_embeds=inputs_embeds, **with_cache(cache), **kwargs)

    base.forward = types.MethodType(forward, base)
    base._kvprune_stepwise = True
    return model
