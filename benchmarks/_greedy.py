"""The QA answer loop both sides of ``kvpress_side_by_side.py`` run (no kvprune import: the kvpress
worker lives in another virtual environment)."""

from __future__ import annotations

import dataclasses
import time

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

# the cache keyword of this transformers release (``cache`` from 5.24 on; kvprune.integrations.compat has the
# same rule, but the kvpress worker's environment does not import kvprune)
_CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"


def answer(model, cache, question: torch.Tensor, n_ctx: int, max_new: int, stop: set[int]) -> tuple[list[int], float]:
    """Feed the question after an ``n_ctx``-token context already in ``cache``, then decode greedily.

    Returns the generated ids and ``perf_counter()`` at the first answer token (end of the prefill).
    """
    pos = torch.arange(n_ctx, n_ctx + question.shape[1]).unsqueeze(0)
    logits = model(input_ids=question, **{_CACHE: cache}, position_ids=pos, use_cache=True, logits_to_keep=1).logits
    t_first = time.perf_counter()
    nxt = int(logits[0, -1].argmax())
    gen = [nxt]
    step = n_ctx + question.shape[1]
    while nxt not in stop and len(gen) < max_new:
        logits = model(input_ids=torch.tensor([[nxt]]), **{_CACHE: cache},
                       position_ids=torch.tensor([[step]]), use_cache=True).logits
        step += 1
        nxt = int(logits[0, -1].argmax())
        gen.append(nxt)
    return gen, t_first
