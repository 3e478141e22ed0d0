"""A cache the user drops frees its memory at once, not when the garbage collector next runs: no reference cycle
between a cache, its layers and the tensors they hand out."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import tp_worker
from conftest import padded_batch, tiny_model

import kvprune


@pytest.mark.parametrize("case", sorted(tp_worker.METHODS))  # every registered method (tests/test_tensor_parallel.py)
def test_a_dropped_cache_frees_its_layers_without_the_garbage_collector(case):
    method, budget, params = tp_worker.METHODS[case]
    model = tiny_model()
    ids, mask = padded_batch([20, 13])
    cache = kvprune.make_cache(model, method, budget, **params)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits[:, -1:].argmax(-1)
        for _ in range(2):
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            pos = pos[:, -1:] + 1
            nxt = model(input_ids=nxt, attention_mask=mask, position_ids=pos,
                        past_key_values=cache).logits[:, -1:].argmax(-1)
    layers = [weakref.ref(layer) for layer in cache.layers]
    gc.collect()
    gc.disable()
    try:
        del cache
        alive = [i for i, ref in enumerate(layers) if ref() is not None]
    finally:
        gc.enable()
    assert not alive, f"layers {alive} of a dropped {case} cache wait for the garbage collector (a reference cycle)"


@pytest.mark.parametrize("case", ["h2o", "tova-kv8", "kvzip", "kvzip-global", "lazyllm", "spatten"])
def test_a_deep_copy_continues_like_the_original(case):
    """Compress once, copy, ask on each (the multi-question use of a compressed document): the copy's layers answer
    to the copy (the weak references back to a cache follow a deep copy) and give the original's logits (the newest
    token's: LazyLLM and SpAtten leave a pruned token's logits NaN by design)."""
    import copy

    method, budget, params = tp_worker.METHODS[case]
    model = tiny_model()
    ids, _ = padded_batch([24])
    question, _ = padded_batch([5], seed=3)
    cache = kvprune.make_cache(model, method, budget, **params)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
        twin = copy.deepcopy(cache)
        runs = []
        for c in (cache, twin):
            logits = model(input_ids=question, past_key_values=c).logits[:, -1]
            nxt = model(input_ids=logits[:, None].argmax(-1), past_key_values=c).logits[:, -1]
            runs.append((logits, nxt))
    torch.testing.assert_close(runs[0], runs[1])
    assert twin.get_seq_length() == cache.get_seq_length() == 24 + 5 + 1
