"""One wrapper on the decoder stack's forward that hands a stepwise cache (LazyLLM, SpAtten) to its own step.

The cache declares its step (``cache.step_forward``, set by the method's factory); any other cache (or none)
runs the model's original forward untouched.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from .compat import pop_cache, with_cache


def prepare_stepwise(model: torch.nn.Module) -> torch.nn.Module:
    """Wrap ``model.model.forward`` once (idempotent): a cache with a ``step_forward`` runs that step instead."""
    base = model.model
    if getattr(base, "_kvprune_stepwise", False):
        return model
    original = base.forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs: Any):
        cache = pop_cache(kwargs)  # ``cache`` from transformers 5.24 on, ``past_key_values`` before
        step = getattr(cache, "step_forward", None)
        if step is not None:
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
