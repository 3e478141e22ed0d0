"""SpAtten: exact without pruning, keep-sets and head sets equal the paper's rules, cascade invariants,
progressive quantization bounds, memory and compute accounting, typed errors."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import ARCHS, padded_batch, tiny_model
from conftest import generate_logits as _generate
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import position_ids_from_mask
from reference_spatten import SpAttenReference
from transformers import DynamicCache

import kvprune
from kvprune.caches.quant import dequantize, quantize
from kvprune.errors import InvalidBudgetError, InvalidParameterError, UnsupportedGenerationModeError
from kvprune.integrations.spatten import progressive_rows
from kvprune.policies.base import rank_grid
from kvprune.policies.spatten import SpAtten

pytestmark = pytest.mark.integration
N_LAYERS = 4


# -- exactness ----------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", [[19], [19, 12, 5]], ids=["batch1", "batch3_leftpad"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_no_pruning_reproduces_baseline(arch, attn, lengths):
    model = tiny_model(arch, attn, num_hidden_layers=N_LAYERS)
    ids, mask = padded_batch(lengths)
    ref_tokens, ref_logits = _generate(model, ids, mask, DynamicCache())
    cache = kvprune.make_cache(model, "spatten", token_ratio=0.0, head_ratio=0.0)
    tokens, logits = _generate(model, ids, mask, cache)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    s = cache.spatten_stats()
    assert s["attention_compute_fraction"] == 1.0
    assert s["kv_bytes"] == s["kv_bytes_full_float"]


def test_no_pruning_beam_search_and_sampling():
    model = tiny_model("llama", "sdpa", num_hidden_layers=N_LAYERS)
    ids, mask = padded_batch([11, 7])
    for kw in ({"num_beams": 3}, {"do_sample": True, "top_k": 5}):
        torch.manual_seed(0)
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0,
                             past_key_values=DynamicCache(), **kw)
        torch.manual_seed(0)
        ours = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0,
                              past_key_values=kvprune.make_cache(model, "spatten", token_ratio=0.0), **kw)
        assert torch.equal(ours, ref), kw


# -- faithfulness: the paper's rules, slow ---------------------------------------------------------
def _reference_run(policy: SpAtten, lengths, steps, attn="eager", seed=0):
    model = tiny_model("llama", attn, dtype=torch.float64, num_hidden_layers=N_LAYERS, seed=seed)
    ids, mask = padded_batch(lengths, seed=seed)
    cache = kvprune.make_cache(model, policy)
    seq, logits = _generate(model, ids, mask, cache, steps, min_new_tokens=steps)
    ref_model = tiny_model("llama", "eager", dtype=torch.float64, num_hidden_layers=N_LAYERS, seed=seed)
    ref = SpAttenReference(ref_model, cache.token_schedule, cache.head_schedule, recent=policy.recent)
    full_mask = torch.cat([mask, torch.ones((len(lengths), steps), dtype=torch.long)], 1)
    pos = position_ids_from_mask(full_mask)
    w = ids.shape[1]
    ref_logits = [ref.forward(seq[:, :w], full_mask[:, :w], pos[:, :w])[:, -1]]
    for t in range(w, seq.shape[1] - 1):
        ref_logits.append(ref.forward(seq[:, t : t + 1], full_mask[:, : t + 1], pos[:, t : t + 1])[:, -1])
    return cache, ref, logits, torch.stack(ref_logits, 1)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "policy",
    [
        SpAtten(token_ratio=0.6, token_start=0.0),
        SpAtten(token_ratio=0.5, head_ratio=0.5, head_start=0.25),
        SpAtten(token_ratios=(0.3, 0.3, 0.7, 0.7), head_ratios=(0.25, 0.5, 0.5, 0.75)),
        SpAtten(token_ratio=0.7, token_start=0.0, recent=3),
    ],
    ids=["tokens", "tokens+heads", "explicit", "recent"],
)
def test_keep_sets_and_head_sets_match_reference(policy, attn):
    cache, ref, logits, ref_logits = _reference_run(policy, [19, 12, 5], steps=5, attn=attn)
    t = cache.depth.shape[1]
    assert cache.depth.tolist() == [d[:t] for d in ref.depth], "token keep-sets differ from the reference"
    assert cache.head_depth.tolist() == ref.head_depth, "head sets differ from the reference"
    torch.testing.assert_close(cache.score.double(), torch.tensor(ref.score, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.double(), ref_logits.double(), atol=1e-5, rtol=1e-5)
    # something was actually pruned, in every layer after the first pruning one
    kept = cache.kept_tokens()
    assert int(kept[-1].sum()) < int(cache.token_valid.sum())


# -- invariants (hypothesis) -----------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _model():
    return tiny_model("llama", "sdpa", dtype=torch.float64, num_hidden_layers=N_LAYERS)


@st.composite
def scenarios(draw):
    ratios = sorted(draw(st.lists(st.sampled_from([0.0, 0.2, 0.5, 0.8]), min_size=N_LAYERS, max_size=N_LAYERS)))
    heads = sorted(draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75]), min_size=N_LAYERS, max_size=N_LAYERS)))
    quant = draw(st.sampled_from([None, (6, 4), (8, 4)]))
    lengths = draw(st.lists(st.integers(1, 16), min_size=1, max_size=3))
    policy = SpAtten(token_ratios=tuple(ratios), head_ratios=tuple(heads), quant_bits=quant)
    return policy, lengths, draw(st.integers(1, 6))


@settings(max_examples=25, deadline=None)
@given(scenarios())
def test_cascade_budget_and_rows_independent(scenario):
    policy, lengths, steps = scenario
    model = _model()
    ids, mask = padded_batch(lengths)
    cache = kvprune.make_cache(model, policy)
    tokens, _ = _generate(model, ids, mask, cache, steps, min_new_tokens=steps)  # no EOS: equal step counts
    n_valid = cache.token_valid.sum(-1)
    for idx, layer in enumerate(cache.layers):
        for r in range(len(lengths)):
            held = sorted(int(p) for p, v in zip(layer.positions[r], layer.valid[r]) if v)
            assert len(held) == len(set(held)), "a token stored twice"
            expected = torch.nonzero((cache.depth[r] > idx) & cache.token_valid[r]).flatten().tolist()
            assert held == expected, "a layer holds exactly the tokens whose depth reaches it"
            if idx > 0:  # cascade: layer l's tokens are a subset of layer l-1's
                prev = {int(p) for p, v in zip(cache.layers[idx - 1].positions[r], cache.layers[idx - 1].valid[r]) if v}
                assert set(held) <= prev
                cap = max(1, int(n_valid[r] * (1 - policy.token_ratios[idx - 1]) + 1e-9))
                assert len(held) <= cap, "more tokens than the budget after a pruning layer"
            assert int(cache.depth[r, -1]) == N_LAYERS, "the newest token goes through every layer"
    # heads: active sets shrink with depth and never come back
    for r in range(len(lengths)):
        for h in range(model.config.num_attention_heads):
            d = int(cache.head_depth[r, h])
            assert all(bool(a[r, h]) == (i < d) for i, a in enumerate(cache.active_heads()))
    again, _ = _generate(model, ids, mask, kvprune.make_cache(model, policy), steps, min_new_tokens=steps)
    assert torch.equal(tokens, again), "deterministic"
    width = ids.shape[1]
    for r, n in enumerate(lengths):
        alone_ids = ids[r : r + 1, width - n :]
        alone_cache = kvprune.make_cache(model, policy)
        alone, _ = _generate(model, alone_ids, torch.ones_like(alone_ids), alone_cache, steps, min_new_tokens=steps)
        assert torch.equal(tokens[r, width:], alone[0, n:]), "rows are not independent"
        assert alone_cache.head_depth[0].tolist() == cache.head_depth[r].tolist()
        assert cache.depth[r][cache.token_valid[r]].tolist() == alone_cache.depth[0].tolist()


def test_pruned_heads_stay_pruned_across_steps():
    model = _model()
    ids, mask = padded_batch([14, 9])
    cache = kvprune.make_cache(model, "spatten", token_ratio=0.5, head_ratio=0.5, head_start=0.0)
    history = []
    past = None
    seq = ids
    am = mask
    for _ in range(5):
        inp = seq if past is None else seq[:, -1:]
        out = model(input_ids=inp, attention_mask=am, past_key_values=cache, use_cache=True)
        past = cache
        history.append(cache.head_depth.clone())
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        am = torch.cat([am, torch.ones_like(nxt)], 1)
    for a, b in zip(history, history[1:]):
        assert bool((b <= a).all()), "a pruned head came back"
    assert bool((history[-1] < N_LAYERS).any()), "no head was pruned"


# -- progressive quantization ----------------------------------------------------------------------
@pytest.mark.parametrize("bits", [(8, 4), (6, 4), (4, 6)])
def test_quantization_error_bounds(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 17, 16, generator=g) * 3
    t = quantize(x, *bits)
    full, msb = dequantize(t, torch.float32, full=True), dequantize(t, torch.float32, full=False)
    eps = 1e-5
    assert bool(((full - x).abs() <= t.scale / 2 + eps).all())
    assert bool(((msb - x).abs() <= t.scale * 2 ** bits[1] / 2 + eps).all())
    assert float((msb - x).abs().max()) > float((full - x).abs().max())  # the LSBs do carry precision
    # storage: msb one byte, lsb packed two per byte when <= 4 bits, plus two float32 per vector
    per_vector = 16 + (8 if bits[1] <= 4 else 16) + 8
    assert t.nbytes == 2 * 3 * 17 * per_vector


def test_recomputed_rows_equal_full_precision_rows():
    g = torch.Generator().manual_seed(1)
    b, gq, q, n, d = 2, 2, 5, 23, 16
    query = torch.randn(b, gq, q, d, generator=g) * 2
    keys, values = torch.randn(b, 1, n, d, generator=g), torch.randn(b, 1, n, d, generator=g)
    tk, tv = quantize(keys, 8, 4), quantize(values, 8, 4)
    k_msb, v_msb = dequantize(tk, torch.float32, False)[:, 0], dequantize(tv, torch.float32, False)[:, 0]
    k_full, v_full = dequantize(tk, torch.float32, True)[:, 0], dequantize(tv, torch.float32, True)[:, 0]
    allowed = torch.ones(b, 1, q, n, dtype=torch.bool)
    rows = torch.ones(b, gq, q, dtype=torch.bool)
    scaling = d**-0.5

    def plain(k, v):
        p = torch.softmax((query @ k[:, None].transpose(-1, -2)) * scaling, -1)
        return p, p @ v[:, None]

    p_full, o_full = plain(k_full, v_full)
    p_msb, o_msb = plain(k_msb, v_msb)
    for tau in (0.0, 0.3, 1.0):
        p, o, low = progressive_rows(query, k_msb, v_msb, lambda: (k_full, v_full), allowed, scaling, tau, rows)
        assert torch.equal(low, rank_grid(p_msb.amax(-1)) < tau)  # decided on the ranking grid
        torch.testing.assert_close(o[low], o_full[low], atol=1e-6, rtol=0)  # refetched rows: full precision
        torch.testing.assert_close(o[~low], o_msb[~low], atol=1e-6, rtol=0)
        torch.testing.assert_close(p[low], p_full[low], atol=1e-6, rtol=0)
    # the MSB-only probabilities stay within what the key error allows: |dlogit| <= |q|_1 * max|dk| * scaling
    dk = (k_msb - k_full).abs().amax(dim=(-1, -2))  # [B]
    bound = query.abs().sum(-1) * dk[:, None, None] * scaling * 2  # logit error on both sides of the softmax
    logit_gap = ((query @ k_msb[:, None].transpose(-1, -2)) - (query @ k_full[:, None].transpose(-1, -2))).abs().amax(-1) * scaling
    assert bool((logit_gap <= bound / 2 + 1e-6).all())
    ratio = (p_msb / p_full).log().abs().amax(-1)
    assert bool((ratio <= bound + 1e-5).all())


def test_quantized_generation_refetches_and_saves_bytes():
    model = tiny_model("llama", "sdpa", num_hidden_layers=N_LAYERS)
    ids, mask = padded_batch([24])
    float_cache = kvprune.make_cache(model, "spatten", token_ratio=0.0)
    ref_tokens, ref_logits = _generate(model, ids, mask, float_cache, 4)
    q_cache = kvprune.make_cache(model, "spatten", token_ratio=0.0, quant_bits=(8, 4), tau=0.1)
    tokens, logits = _generate(model, ids, mask, q_cache, 4)
    s = q_cache.spatten_stats()
    assert 0 < s["rows_refetched"] < s["rows"]
    # head_dim 16: 16 MSB bytes + 8 packed LSB bytes + 8 bytes of range per vector, against 64 in float32
    assert s["kv_bytes"] * 64 == s["kv_bytes_full_float"] * 32
    assert s["bytes_read"] < s["bytes_read_full_float"]
    # 12-bit storage barely moves the logits; with every row refetched even less
    assert float((logits - ref_logits).abs().max()) < 0.05
    all_cache = kvprune.make_cache(model, "spatten", token_ratio=0.0, quant_bits=(8, 4), tau=1.0)
    _, all_logits = _generate(model, ids, mask, all_cache, 4)
    assert float((all_logits - ref_logits).abs().max()) <= float((logits - ref_logits).abs().max()) + 1e-6


# -- memory and compute accounting -----------------------------------------------------------------
def test_gqa_memory_freed_only_when_whole_group_pruned():
    model = tiny_model("llama", "sdpa", num_hidden_layers=N_LAYERS)  # 4 query heads, 2 KV heads
    ids, mask = padded_batch([20])
    one = kvprune.make_cache(model, "spatten", token_ratio=0.0, head_ratios=(0.0, 0.25, 0.25, 0.25))
    _generate(model, ids, mask, one, 3)
    two = kvprune.make_cache(model, "spatten", token_ratio=0.0, head_ratios=(0.0, 0.5, 0.5, 0.5))
    _generate(model, ids, mask, two, 3)
    s1, s2 = one.spatten_stats(), two.spatten_stats()
    assert s1["heads_active_per_layer"] == [4, 4, 3, 3]  # head_ratios[l]: pruned after layer l
    assert s2["heads_active_per_layer"] == [4, 4, 2, 2]
    # one head of a group gone: compute saved, no memory freed
    assert s1["kv_heads_stored_per_layer"] == [2, 2, 2, 2] and s1["kv_bytes"] == s1["kv_bytes_full_float"]
    assert s1["attention_compute_fraction"] < 1.0
    active = two.active_heads()[2][0].view(2, 2)
    groups_gone = int((~active.any(-1)).sum())
    assert s2["kv_heads_stored_per_layer"] == [2, 2] + [2 - groups_gone] * 2
    # three of four heads gone: one whole group is, so its KV head's memory is freed in layers 2 and 3
    three = kvprune.make_cache(model, "spatten", token_ratio=0.0, head_ratios=(0.0, 0.75, 0.75, 0.75))
    _generate(model, ids, mask, three, 3)
    s3 = three.spatten_stats()
    assert s3["heads_active_per_layer"] == [4, 4, 1, 1]
    assert s3["kv_heads_stored_per_layer"] == [2, 2, 1, 1]
    assert s3["kv_bytes"] * 4 == s3["kv_bytes_full_float"] * 3
    assert s3["attention_compute_fraction"] < s2["attention_compute_fraction"] < s1["attention_compute_fraction"] < 1


def test_token_pruning_saves_memory_and_compute():
    model = tiny_model("llama", "sdpa", num_hidden_layers=N_LAYERS)
    ids, mask = padded_batch([40])
    cache = kvprune.make_cache(model, "spatten", 0.6)  # 60 % of the KV memory, averaged over layers
    _generate(model, ids, mask, cache, 8)
    s = cache.spatten_stats()
    kept = s["tokens_kept_per_layer"]
    assert kept[0] == cache.n_seen and all(a >= b for a, b in zip(kept, kept[1:]))
    assert abs(sum(kept) / (len(kept) * cache.n_seen) - 0.6) < 0.06
    assert s["kv_bytes"] <= 0.66 * s["kv_bytes_full_float"]
    assert s["attention_compute_fraction"] < 0.9
    st = cache.stats()
    assert st.tokens_seen == cache.n_seen and st.kv_bytes == s["kv_bytes"]


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [{"token_ratio": 1.0}, {"token_ratio": -0.1}, {"head_ratio": 1.5}, {"token_start": 2.0}, {"tau": 1.5},
     {"quant_bits": (9, 4)}, {"quant_bits": (8,)}, {"quant_bits": (0, 4)}, {"token_ratio": True},
     {"recent": -1}, {"importance": "norm"}],
)
def test_invalid_parameters(kwargs):
    with pytest.raises(InvalidParameterError):
        SpAtten(**kwargs)


def test_invalid_budgets_and_usage():
    model = tiny_model("llama", "sdpa", num_hidden_layers=N_LAYERS)
    with pytest.raises(InvalidBudgetError, match="smallest reachable"):
        kvprune.make_cache(model, "spatten", 0.1)
    with pytest.raises(InvalidBudgetError, match="fraction of KV memory"):
        kvprune.make_cache(model, "spatten", 100)
    with pytest.raises(InvalidParameterError, match="one ratio per layer"):
        kvprune.make_cache(model, "spatten", token_ratios=(0.1, 0.2))
    with pytest.raises(InvalidParameterError, match="not both"):
        kvprune.make_cache(model, SpAtten(), 0.5)
    with pytest.raises(InvalidParameterError, match=r"spatten has no parameter\(s\) \['nonsense'\]"):
        kvprune.make_cache(model, "spatten", nonsense=1)
    cache = kvprune.make_cache(model, "spatten")
    with pytest.raises(UnsupportedGenerationModeError):
        cache.crop(3)


def test_assisted_decoding_refused():
    model = tiny_model("llama", "sdpa", num_hidden_layers=N_LAYERS)
    assistant = tiny_model("llama", "sdpa", num_hidden_layers=N_LAYERS, seed=1)
    ids, mask = padded_batch([12])
    cache = kvprune.make_cache(model, "spatten")  # before ``model.generate`` is looked up: it installs the guard
    with pytest.raises(UnsupportedGenerationModeError):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                       assistant_model=assistant, past_key_values=cache)
