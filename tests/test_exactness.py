"""Budget >= sequence length: every policy reproduces DynamicCache's tokens and logits."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import ARCHS, padded_batch, tiny_model
from transformers import DynamicCache

import kvprune

pytestmark = pytest.mark.integration

POLICIES = sorted(kvprune.POLICIES)
NEW_TOKENS = 8
PARAMS = {"snapkv": {"window": 8}}
BATCHES = {"batch1": [17], "batch3_leftpad": [17, 11, 6]}


def _generate(model, ids, mask, cache=None, **kw):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        past_key_values=cache,
        output_logits=True,
        return_dict_in_generate=True,
        **kw,
    )
    return out.sequences, torch.stack(out.logits, 1)


@functools.lru_cache(maxsize=None)
def _reference(arch: str, attn: str, batch: str):
    model = tiny_model(arch, attn)
    ids, mask = padded_batch(BATCHES[batch])
    return _generate(model, ids, mask, DynamicCache())


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", POLICIES)
def test_large_budget_reproduces_dynamic_cache(policy, arch, attn, batch):
    ref_tokens, ref_logits = _reference(arch, attn, batch)
    model = tiny_model(arch, attn)
    ids, mask = padded_batch(BATCHES[batch])
    budget = None if policy == "full" else ids.shape[1] + NEW_TOKENS
    cache = kvprune.make_cache(model, policy, budget, **PARAMS.get(policy, {}))
    tokens, logits = _generate(model, ids, mask, cache)
    assert model.config._attn_implementation == f"kvprune_{attn}"
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    assert sum(cache.stats().evictions) == 0
    assert cache.get_seq_length() == ids.shape[1] + NEW_TOKENS - 1


@pytest.mark.parametrize("policy", ["a2sf", "h2o", "tova", "snapkv"])
def test_multi_turn_continuation_matches_dynamic_cache(policy):
    """A cache continued across two generate calls (a second user turn appended) stays exact."""
    model = tiny_model("llama", "sdpa")
    ids, mask = padded_batch([12, 9])
    turn2, mask2 = padded_batch([5, 5], seed=1)
    outs = []
    for cache in (DynamicCache(), kvprune.make_cache(model, policy, 64, **PARAMS.get(policy, {}))):
        seq, _ = _generate(model, ids, mask, cache)
        full_ids = torch.cat([seq, turn2], 1)
        full_mask = torch.cat([mask, torch.ones_like(seq[:, ids.shape[1]:]), mask2], 1)
        seq2, logits2 = _generate(model, full_ids, full_mask, cache)
        outs.append((seq2, logits2))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("policy", ["full", "a2sf", "knorm"])
def test_sampling_and_beam_search_match_dynamic_cache(policy):
    model = tiny_model("qwen2", "sdpa")
    ids, mask = padded_batch([10, 7])
    budget = None if policy == "full" else 64
    for kw in (dict(do_sample=True, top_k=20), dict(num_beams=3, num_return_sequences=2)):
        results = []
        for cache in (DynamicCache(), kvprune.make_cache(model, policy, budget)):
            torch.manual_seed(123)
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, past_key_values=cache, **kw
            )
            results.append(out)
        assert torch.equal(results[0], results[1]), kw


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prepared_model_without_kvprune_cache_is_unchanged(attn):
    """A prepared model run with DynamicCache or no cache gives the same logits as before preparing it."""
    model = tiny_model("mistral", attn)
    ids, mask = padded_batch([15, 8, 11])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        kvprune.prepare_model(model)
        after = model(input_ids=ids, attention_mask=mask).logits
        no_cache = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    valid = mask.bool()
    torch.testing.assert_close(after[valid], before[valid], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(no_cache[valid], before[valid], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("keys", ["short", "long"])
@pytest.mark.parametrize("policy", ["full", "streaming"])
def test_decode_kernel_switch_matches(policy, keys):
    """Decode steps nobody observes use the SDPA kernel or the explicit row by key count: exact on both sides."""
    from kvprune.integrations.attention import DECODE_KERNEL_MAX_KEYS, DECODE_KERNEL_MIN_KEYS

    model = tiny_model("llama", "sdpa", num_hidden_layers=1)
    n = DECODE_KERNEL_MAX_KEYS - 8 if keys == "short" else DECODE_KERNEL_MIN_KEYS + 16
    ids = torch.randint(3, 100, (1, n), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(input_ids=ids, past_key_values=DynamicCache(), **kw)
    budget = None if policy == "full" else n + 8
    ours = model.generate(input_ids=ids, past_key_values=kvprune.make_cache(model, policy, budget), **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(ref.logits), atol=2e-5, rtol=1e-4)
