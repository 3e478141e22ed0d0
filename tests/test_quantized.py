"""Quantized KV storage (``kv_bits``): the codec's error and bytes, attention within the bound the quantization
step gives, keep-sets equal to the float cache where scores do not read stored precision, the cache invariants
on quantized storage, decode steps that never dequantize the cache, beams, stats and typed errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import generate_logits, padded_batch, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_invariants import _check_layer_invariants, _run, check_rows_independent_and_deterministic, scenarios

import kvprune
from kvprune.caches.quantized import Codec, QuantizedLayer, QuantizedPruningCache
from kvprune.errors import InvalidParameterError
from kvprune.integrations import quantized as qattn

pytestmark = pytest.mark.integration

BITS = [8, 4, (8, 4)]
#: the quantization step of 4 bits over 8 bits for the same range: (2**8 - 1) / (2**4 - 1)
STEP_RATIO_4_OVER_8 = 255 / 15


# -- the codec ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dim", [16, 64, 13])
def test_codec_error_within_half_a_step_and_packed_size(bits, dim):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(2, 3, 11, dim, generator=g) * 4 + 1
    codec = Codec(bits, dim)
    rec = codec.encode(x)
    assert rec.dtype == torch.uint8
    # levels one per byte (8 bits) or two per byte (4 bits), padded to 4 bytes, plus a float32 offset and scale
    level_bytes = dim if bits == 8 else math.ceil(dim / 2)
    assert rec.shape == (2, 3, 11, math.ceil(level_bytes / 4) * 4 + 8)
    back = codec.decode(rec, torch.float32)
    step = codec.step(rec)[..., None]
    assert torch.allclose(step, (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2**bits - 1))
    assert bool(((back - x).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all())
    assert float((back - x).abs().max()) > 0  # it did quantize
    # the extremes of each vector are exact levels (offset and offset + levels * scale)
    torch.testing.assert_close(back.amin(-1), x.amin(-1), atol=1e-5, rtol=0)


# -- typed errors, refused before the model changes -------------------------------------------------
@pytest.mark.parametrize("bad", [3, 16, 0, 2, True, "8", 8.0, (8,), (8, 2), (8, 4, 4), [4, None]])
def test_bad_kv_bits_refused_before_the_model_changes(bad):
    model = tiny_model("llama", "sdpa")
    with pytest.raises(InvalidParameterError, match=r"kv_bits is one of 8, 4") as err:
        kvprune.make_cache(model, "h2o", 16, kv_bits=bad)
    assert repr(bad) in str(err.value)
    assert model.config._attn_implementation == "sdpa", "the model was changed before the error"


@pytest.mark.parametrize("method, hint", [("lazyllm", "LazyLLM"), ("spatten", "quant_bits")])
def test_lazyllm_and_spatten_refuse_kv_bits(method, hint):
    model = tiny_model("llama", "sdpa")
    with pytest.raises(InvalidParameterError, match=hint):
        kvprune.make_cache(model, method, kv_bits=8)
    assert model.config._attn_implementation == "sdpa"


# -- exactness within the step's bound ----------------------------------------------------------------
def _capture_decode(cache):
    """Record every float K/V a layer is given (by position) and each decode step's (query, output, layer state)."""
    written, steps = {}, []
    for layer in cache.layers:
        orig_update = layer.update

        def update(k, v, *a, _layer=layer, _orig=orig_update, **kw):
            for j in range(k.shape[2]):
                written[(_layer.layer_idx, _layer.n_seen + j)] = (k[:, :, j].clone(), v[:, :, j].clone())
            return _orig(k, v, *a, **kw)

        layer.update = update

    def attention(layer, query, key, value, backend, scaling, sliding_window=None):
        out, obs = qattn.quantized_decode_attention(layer, query, key, value, backend, scaling, sliding_window)
        ks, vs = layer.quantization_step()
        steps.append(dict(layer=layer.layer_idx, query=query.clone(), out=out.clone(), scaling=scaling,
                          positions=layer.positions.clone(), valid=layer.valid.clone(), ks=ks.clone(), vs=vs.clone()))
        return out, obs

    cache.attach_attention(attention)
    return written, steps


@pytest.mark.parametrize("bits", BITS)
def test_decode_attention_within_the_bound_of_the_quantization_step(bits):
    """Per decode step and head: |o' - o| <= max step_v / 2 + (exp(2 d) - 1) max|v|, with
    d = scaling * |q|_1 * max step_k / 2 the largest logit error the stored keys allow (the newest token is exact)."""
    model = tiny_model("llama", "sdpa")
    ids, mask = padded_batch([19, 12])
    cache = kvprune.make_cache(model, "h2o", 64, kv_bits=bits)
    written, steps = _capture_decode(cache)
    generate_logits(model, ids, mask, cache, 5)
    assert steps
    worst = 0.0
    for st_ in steps:
        q = st_["query"]  # [B, Hq, 1, D]
        b, hq = q.shape[:2]
        pos, valid = st_["positions"], st_["valid"]  # [B, Hkv, S]
        hkv, s = pos.shape[1:]
        g = hq // hkv
        for r in range(b):
            for h in range(hq):
                kv = h // g
                slots = [j for j in range(s) if bool(valid[r, kv, j])]
                k = torch.stack([written[(st_["layer"], int(pos[r, kv, j]))][0][r, kv] for j in slots])
                v = torch.stack([written[(st_["layer"], int(pos[r, kv, j]))][1][r, kv] for j in slots])
                p = torch.softmax((k @ q[r, h, 0]) * st_["scaling"], -1)
                ref = p @ v
                old = torch.tensor([j != s - 1 for j in slots])  # this step's token is read in float
                dk = float(st_["ks"][r, kv, slots][old].max()) / 2
                dv = float(st_["vs"][r, kv, slots][old].max()) / 2
                d = st_["scaling"] * float(q[r, h, 0].abs().sum()) * dk
                bound = dv + math.expm1(2 * d) * float(v.abs().max())
                err = float((st_["out"][r, 0, h] - ref).abs().max())
                assert err <= bound * (1 + 1e-4) + 1e-6, (err, bound)
                worst = max(worst, err)
    assert worst > 0  # the stored precision is really read


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("policy", ["full", "h2o", "tova", "keydiff"])
def test_budget_covering_the_sequence_stays_within_the_step_of_the_float_cache(policy, bits):
    """End to end over 2 layers and 8 steps: logits within 0.005 of the float cache at 8 bits and 17x that (the step
    ratio) with 4-bit values or keys; greedy tokens equal at 8 bits; 4 bits moves the logits more than 8 bits."""
    model = tiny_model("llama", "sdpa")
    ids, mask = padded_batch([17, 11, 6])
    budget = None if policy == "full" else ids.shape[1] + 8
    ref_tokens, ref = generate_logits(model, ids, mask, kvprune.make_cache(model, policy, budget), 8)
    cache = kvprune.make_cache(model, policy, budget, kv_bits=bits)
    tokens, logits = generate_logits(model, ids, mask, cache, 8)
    err = float((logits - ref).abs().max())
    four = 4 in (bits if isinstance(bits, tuple) else (bits,))
    assert 0 < err <= 0.005 * (STEP_RATIO_4_OVER_8 if four else 1.0)
    if not four:
        assert torch.equal(tokens, ref_tokens)
        _, l4 = generate_logits(model, ids, mask, kvprune.make_cache(model, policy, budget, kv_bits=4), 8)
        assert float((l4 - ref).abs().max()) > err
    assert sum(cache.stats().evictions) == 0


def test_prefill_output_is_the_float_caches():
    """A fresh prompt's tokens are read in float: the first logits are exactly the float cache's."""
    model = tiny_model("llama", "sdpa")
    ids, mask = padded_batch([15, 9])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, past_key_values=kvprune.make_cache(model, "full")).logits
        got = model(input_ids=ids, attention_mask=mask, past_key_values=kvprune.make_cache(model, "full", kv_bits=4)).logits
    assert torch.equal(got, ref)


def test_a_later_prompt_chunk_reads_the_held_tokens_dequantized():
    """A multi-token forward on a non-empty cache (a question after its context, a prompt chunk): its own tokens
    are float, the held ones dequantized -- the first chunk exact, the second within the step's bound."""
    model = tiny_model("llama", "sdpa")
    ids, _ = padded_batch([20])

    def chunked(cache):
        with torch.no_grad():
            first = model(input_ids=ids[:, :12], past_key_values=cache).logits
            return first, model(input_ids=ids[:, 12:], past_key_values=cache).logits

    ref = chunked(kvprune.make_cache(model, "h2o", 40))
    for bits, bound in ((8, 0.005), (4, 0.005 * STEP_RATIO_4_OVER_8)):
        got = chunked(kvprune.make_cache(model, "h2o", 40, kv_bits=bits))
        assert torch.equal(got[0], ref[0])
        assert 0 < float((got[1] - ref[1]).abs().max()) <= bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    """Records hold float32 ranges whatever the model's dtype; the layer serves the model's dtype."""
    model = tiny_model("llama", "sdpa", dtype=dtype)
    ids, mask = padded_batch([17, 11])
    ref_tokens, ref = generate_logits(model, ids, mask, kvprune.make_cache(model, "h2o", 40), 6)
    for bits, bound in ((8, 0.01), (4, 0.005 * STEP_RATIO_4_OVER_8)):
        cache = kvprune.make_cache(model, "h2o", 40, kv_bits=bits)
        tokens, logits = generate_logits(model, ids, mask, cache, 6)
        assert all(layer.dtype == dtype and layer.keys.dtype == torch.uint8 for layer in cache.layers)
        assert float((logits.float() - ref.float()).abs().max()) <= bound
        if bits == 8:
            assert torch.equal(tokens, ref_tokens)


# -- keep-sets ----------------------------------------------------------------------------------------
KEEP_SAME = [
    ("streaming", {"n_sink": 2}, {}),
    ("random", {"seed": 3}, {}),
    ("knorm", {}, {}),  # scored from each token's float key when it is written
    ("tova", {}, {"prefill_only": True}),  # scored once, from the prompt's float attention
    ("snapkv", {"window": 4}, {"prefill_only": True}),
    ("h2o", {}, {"prefill_only": True}),
]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("policy, params, schedule", KEEP_SAME)
def test_keep_sets_equal_the_float_cache_where_scores_do_not_read_stored_precision(policy, params, schedule, bits):
    model = tiny_model("llama", "sdpa")
    ids, mask = padded_batch([20, 13, 7])
    ref = kvprune.make_cache(model, policy, 9, **schedule, **params)
    generate_logits(model, ids, mask, ref, 6, min_new_tokens=6)
    cache = kvprune.make_cache(model, policy, 9, kv_bits=bits, **schedule, **params)
    generate_logits(model, ids, mask, cache, 6, min_new_tokens=6)
    assert sum(cache.stats().evictions) > 0
    for a, b in zip(ref.layers, cache.layers):
        assert torch.equal(a.positions[a.valid], b.positions[b.valid]) and torch.equal(a.valid, b.valid)
        assert a.evictions == b.evictions


# -- invariants on quantized storage (hypothesis, the float cache's scenarios) ------------------------
def _check_quantized_invariants(cache, written):
    """The float cache's invariants, with "kept K/V bit-identical to what was written" read as "kept records
    bit-identical to the encoding of what was written"."""
    assert all(isinstance(layer, QuantizedLayer) for layer in cache.layers)

    def stored(layer, k, v):
        kc, vc = layer.codecs
        return kc.encode(k[None, None, None])[0, 0, 0], vc.encode(v[None, None, None])[0, 0, 0]

    _check_layer_invariants(cache, written, stored)


def _quantized(scenario, bits):
    name, params, budget, lengths, steps, backend = scenario
    return name, {**params, "kv_bits": bits}, budget, lengths, steps, backend


@settings(max_examples=40, deadline=None)
@given(scenarios(), st.sampled_from([8, 4, (8, 4)]))
def test_cache_invariants_on_quantized_storage(scenario, bits):
    name, params, budget, lengths, steps, backend = _quantized(scenario, bits)
    ids, mask = padded_batch(lengths)
    _run(name, params, budget, ids, mask, steps, backend, check=_check_quantized_invariants)


@settings(max_examples=25, deadline=None)
@given(scenarios(), st.sampled_from([8, 4]))
def test_rows_independent_and_deterministic_on_quantized_storage(scenario, bits):
    check_rows_independent_and_deterministic(_quantized(scenario, bits))


# -- decode steps read records block by block --------------------------------------------------------
def test_decode_steps_never_dequantize_the_cache_and_blocks_agree(monkeypatch):
    """At one-token steps nothing decodes the whole cache (only multi-token forwards do); many small blocks give
    the one-block result; and the block-wise path equals reading a dequantized float copy (the shared path)."""
    model = tiny_model("llama", "sdpa")
    ids, mask = padded_batch([30, 21])
    decoded = []
    orig = Codec.decode

    def counting(self, rec, dtype):
        decoded.append(rec.shape[-2])
        return orig(self, rec, dtype)

    monkeypatch.setattr(Codec, "decode", counting)
    cache = kvprune.make_cache(model, "tova", 20, kv_bits=4)
    tokens, logits = generate_logits(model, ids, mask, cache, 6, min_new_tokens=6)
    n_layers = len(cache.layers)
    assert len(decoded) == 2 * n_layers, "only the prompt's forward decoded records (keys and values per layer)"
    monkeypatch.setattr(qattn, "BLOCK_ELEMENTS", 3 * 16)  # one slot per block
    small = kvprune.make_cache(model, "tova", 20, kv_bits=4)
    t2, l2 = generate_logits(model, ids, mask, small, 6, min_new_tokens=6)
    assert torch.equal(tokens, t2)
    torch.testing.assert_close(l2, logits, atol=1e-5, rtol=0)
    shared = kvprune.make_cache(model, "tova", 20, kv_bits=4)
    shared.attach_attention(None)  # every step through a dequantized float copy and the shared attention path
    t3, l3 = generate_logits(model, ids, mask, shared, 6, min_new_tokens=6)
    assert torch.equal(tokens, t3)
    torch.testing.assert_close(l3, logits, atol=1e-5, rtol=0)
    for a, b in zip(cache.layers, shared.layers):
        assert torch.equal(a.positions, b.positions)


# -- beams, stats ------------------------------------------------------------------------------------
def test_beam_search_reorders_records_with_their_rows():
    model = tiny_model("llama", "sdpa")
    ids, mask = padded_batch([14, 9])
    kw = dict(num_beams=3, num_return_sequences=3)
    ref, _ = generate_logits(model, ids, mask, kvprune.make_cache(model, "h2o", 40), 6, **kw)
    got, _ = generate_logits(model, ids, mask, kvprune.make_cache(model, "h2o", 40, kv_bits=8), 6, **kw)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("bits, per_vector", [(8, 16 + 8), (4, 8 + 8), ((8, 4), None)])
def test_stats_report_packed_bytes(bits, per_vector):
    """head_dim 16: 8 bits hold 16 + 8 bytes per vector, 4 bits 8 + 8, against 64 in float32; with and without eviction."""
    model = tiny_model("llama", "sdpa")
    ids, mask = padded_batch([20, 13])
    for policy, budget in (("full", None), ("h2o", 10)):
        ref = kvprune.make_cache(model, policy, budget)
        generate_logits(model, ids, mask, ref, 4, min_new_tokens=4)
        cache = kvprune.make_cache(model, policy, budget, kv_bits=bits)
        generate_logits(model, ids, mask, cache, 4, min_new_tokens=4)
        s, f = cache.stats(), ref.stats()
        assert s.slots == f.slots
        vectors = sum(layer.keys.shape[0] * layer.keys.shape[1] * layer.physical_length for layer in cache.layers)
        k_bytes, v_bytes = (per_vector, per_vector) if per_vector else (24, 16)
        assert s.kv_bytes == vectors * (k_bytes + v_bytes)
        assert f.kv_bytes == vectors * 2 * 16 * 4
        assert isinstance(cache, QuantizedPruningCache) and "kv_bits" in repr(cache)


@pytest.mark.parametrize("method", ["h2o", "streaming"])
@pytest.mark.parametrize("every", [1, 4])
def test_quantized_decode_evictions_decide_as_the_general_path(method, every, monkeypatch):
    """Packed keys and values move with the few-slot decode eviction like float ones: with it switched off, the
    general sort-and-gather path keeps the same tokens and gives the same logits (a padded batch)."""
    from test_amortised_eviction import _kept, _steps

    from kvprune.caches.layer import PruningLayer

    model = tiny_model()
    runs = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(PruningLayer, "_evict_over", lambda self: False)
        ids, mask = padded_batch([30, 21])
        cache = kvprune.make_cache(model, method, 12, evict_every=every, kv_bits=8)
        runs.append([(logits, _kept(cache)) for logits in _steps(model, cache, ids, mask, 12)])
    for (la, ka), (lb, kb) in zip(*runs):
        assert ka == kb
        torch.testing.assert_close(la, lb)
