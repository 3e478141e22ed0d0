"""LazyLLM: exact when nothing is pruned, at most one computation per token and layer, revival is exact."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import ARCHS, padded_batch, tiny_model
from conftest import generate_logits as _generate
from hypothesis import given
from hypothesis import strategies as st
from transformers import DynamicCache

from kvprune.errors import InvalidParameterError
from kvprune.integrations.compat import with_cache
from kvprune.integrations.lazyllm import make_lazy_cache
from kvprune.policies.lazyllm import LazyLLM

pytestmark = pytest.mark.integration
N_LAYERS = 4


@pytest.mark.parametrize("lengths", [[19], [19, 12, 5]], ids=["batch1", "batch3_leftpad"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_no_pruning_reproduces_baseline(arch, attn, lengths):
    model = tiny_model(arch, attn, num_hidden_layers=N_LAYERS)
    ids, mask = padded_batch(lengths)
    ref_tokens, ref_logits = _generate(model, ids, mask, DynamicCache())
    cache = make_lazy_cache(model, LazyLLM(prune_ratios=(0.0, 0.0, 0.0)))
    tokens, logits = _generate(model, ids, mask, cache)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    stats = cache.compute_stats()
    assert stats["computed"] == stats["baseline"]


@functools.lru_cache(maxsize=None)
def _model(attn="sdpa"):
    return tiny_model("llama", attn, dtype=torch.float64, num_hidden_layers=N_LAYERS)


@st.composite
def schedules(draw):
    layers = draw(st.lists(st.integers(0, N_LAYERS - 2), min_size=1, max_size=3, unique=True))
    ratios = draw(st.lists(st.sampled_from([0.2, 0.5, 0.8]), min_size=len(layers), max_size=len(layers)))
    decode = draw(st.none() | st.lists(st.sampled_from([0.0, 0.2, 0.8]), min_size=len(layers), max_size=len(layers)))
    lengths = draw(st.lists(st.integers(1, 16), min_size=1, max_size=3))
    policy = LazyLLM(prune_layers=tuple(sorted(layers)), prune_ratios=tuple(ratios), decode_ratios=decode)
    return policy, lengths, draw(st.integers(1, 6))


@given(schedules())
def test_at_most_once_and_rows_independent(scenario):
    policy, lengths, steps = scenario
    model = _model()
    ids, mask = padded_batch(lengths)
    cache = make_lazy_cache(model, policy)
    tokens, _ = _generate(model, ids, mask, cache, steps)
    assert int(cache.computed.max()) <= 1, "a token was computed twice at one layer"
    assert bool((cache.computed[~cache.token_valid] == 0).all()), "padding was computed"
    # every generated token's input went through every layer (the newest token is always kept)
    width = ids.shape[1]
    assert bool((cache.computed[:, width:] == 1).all())
    stats = cache.compute_stats()
    assert stats["computed"] <= stats["baseline"]
    for idx, layer in enumerate(cache.layers):  # a layer holds exactly the tokens computed there, once each
        for r in range(ids.shape[0]):
            held = layer.positions[r][layer.valid[r]].tolist()
            assert len(held) == len(set(held)), "a position stored twice"
            assert set(held) == set(torch.nonzero(cache.computed[r, :, idx]).flatten().tolist())
    again, _ = _generate(model, ids, mask, make_lazy_cache(model, policy), steps)
    assert torch.equal(tokens, again), "deterministic"
    for r, n in enumerate(lengths):
        alone_ids = ids[r : r + 1, width - n :]
        alone, _ = _generate(model, alone_ids, torch.ones_like(alone_ids), make_lazy_cache(model, policy), steps)
        gen = alone[:, n:]  # the row alone may stop earlier at EOS; the batch pads it after that
        assert torch.equal(tokens[r : r + 1, width : width + gen.shape[1]], gen), f"row {r} differs from the row run alone"


def _record_selections(cache):
    """Log (layer, query positions, query validity, selection) each time a layer runs."""
    log = []
    for layer in cache.layers:
        original = layer.begin

        def begin(step, _layer=layer, _orig=original):
            log.append((_layer.layer_idx, step.query_positions.clone(), step.query_valid.clone(), step.selected.clone()))
            _orig(step)

        layer.begin = begin
    return log


@pytest.mark.parametrize("decode_ratios", [None, (0.0, 0.2, 0.8)], ids=["same", "decode_gentler"])
@pytest.mark.parametrize("lengths", [[21], [21, 14]])
def test_revived_tokens_equal_full_recomputation(lengths, decode_ratios):
    """One full eager forward over all tokens, each (token, layer) masked to the keys LazyLLM let it see
    when it computed it, gives the same K/V and logits as the incremental run with its Aux Cache."""
    model = _model("eager")
    ids, mask = padded_batch(lengths)
    policy = LazyLLM(prune_layers=(0, 1, 2), prune_ratios=(0.5, 0.5, 0.5), decode_ratios=decode_ratios)
    cache = make_lazy_cache(model, policy)
    log = _record_selections(cache)
    tokens, logits = _generate(model, ids, mask, cache, 8)
    stats = cache.compute_stats()
    assert stats["computed"] < stats["baseline"], "the schedule pruned something"
    # some token was pruned at one step and resumed from the Aux Cache at a later one
    first_step, step, revived = {}, -1, 0
    for layer, qpos, qvalid, _ in log:
        step += layer == 0
        for r, p in zip(*torch.nonzero(qvalid, as_tuple=True)):
            key = (int(r), int(qpos[r, p]))
            first_step.setdefault(key, step)
            revived += first_step[key] < step
    assert revived > 0
    b, t = cache.token_valid.shape
    # the mask each (token, layer) was computed under
    allowed = torch.zeros((N_LAYERS, b, t, t), dtype=torch.bool)
    pos = torch.arange(t)
    for layer, qpos, qvalid, selected in log:
        for r in range(b):
            for p in qpos[r][qvalid[r]].tolist():
                n = selected.shape[1]
                allowed[layer, r, p, :n] = selected[r] & (pos[:n] <= p)
    allowed |= torch.eye(t, dtype=torch.bool)  # never-computed rows: finite, unused
    reference = tiny_model("llama", "eager", dtype=torch.float64, num_hidden_layers=N_LAYERS)
    hooks = []
    for i, layer in enumerate(reference.model.layers):
        def pre(module, args, kwargs, _i=i):
            kwargs["attention_mask"] = torch.where(allowed[_i][:, None], 0.0, float("-inf")).to(torch.float64)
            return args, kwargs
        hooks.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
    ref_cache = DynamicCache()
    full_ids = tokens[:, : t]
    with torch.no_grad():
        out = reference(input_ids=full_ids, position_ids=cache.rope_pos, past_key_values=ref_cache).logits
    for layer_idx, layer in enumerate(cache.layers):
        for r in range(b):
            for slot in torch.nonzero(layer.valid[r]).flatten().tolist():
                p = int(layer.positions[r, slot])
                torch.testing.assert_close(layer.keys[r, :, slot], ref_cache.layers[layer_idx].keys[r, :, p])
                torch.testing.assert_close(layer.values[r, :, slot], ref_cache.layers[layer_idx].values[r, :, p])
    # each generated token's logits come from the last prompt/generated position before it
    width = ids.shape[1]
    out = out.to(logits.dtype)
    torch.testing.assert_close(logits[:, 1:], out[:, width : t][:, : logits.shape[1] - 1])
    torch.testing.assert_close(logits[:, 0], out[:, width - 1])


def test_schedule_and_parameters():
    assert LazyLLM().schedule(10) == {3: 0.5, 6: 0.5, 8: 0.5}
    assert LazyLLM(prune_layers=(1,), prune_ratios=(0.0,)).schedule(4) == {}
    for bad in (dict(prune_ratios=(1.0, 0.5, 0.5)), dict(prune_layers=(0.3,)), dict(prune_layers=(-1, 2, 3)),
                dict(prune_ratios=(float("nan"), 0.1, 0.1))):
        with pytest.raises(InvalidParameterError):
            LazyLLM(**bad)
    with pytest.raises(InvalidParameterError, match="valid: 0..2"):
        LazyLLM(prune_layers=(3,), prune_ratios=(0.5,)).schedule(4)
    gentler = LazyLLM(prune_layers=(1, 2), prune_ratios=(0.6, 0.8), decode_ratios=(0.0, 0.5))
    assert gentler.schedule(4) == {1: 0.6, 2: 0.8} and gentler.schedule(4, decoding=True) == {2: 0.5}
    assert LazyLLM().schedule(10, decoding=True) == LazyLLM().schedule(10)  # default: the prompt's ratios
    for bad in (dict(decode_ratios=(0.5,)), dict(decode_ratios=(0.5, 1.0, 0.5))):
        with pytest.raises(InvalidParameterError, match="decode_ratios|fraction"):
            LazyLLM(**bad)


def test_decode_ratios_apply_to_decoding_steps_only():
    """A prompt step prunes with prune_ratios; a decoding step that prunes nothing revives every deferred
    token, each still computed once per layer."""
    model = _model()
    ids, mask = padded_batch([24, 17])
    cache = make_lazy_cache(model, LazyLLM(prune_layers=(0, 2), prune_ratios=(0.5, 0.5), decode_ratios=(0.0, 0.0)))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **with_cache(cache))
        after_prompt = cache.compute_stats()
        nxt = torch.ones((2, 1), dtype=torch.long)
        model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), **with_cache(cache))
    assert after_prompt["computed"] < after_prompt["baseline"]
    valid = cache.token_valid
    assert bool((cache.computed[valid] == 1).all()), "every real token computed exactly once at every layer"
    assert bool((cache.computed[~valid] == 0).all())


def test_select_keeps_newest_and_prunes_percentile():
    imp = torch.tensor([[0.5, 0.1, 0.3, 0.0, 0.2]])
    present = torch.tensor([[True, True, True, False, True]])
    newest = torch.tensor([[False, False, False, False, True]])
    keep = LazyLLM.select(imp, present, newest, 0.5)  # 4 present, prune 2: the lowest are 0.1 and 0.3
    assert keep.tolist() == [[True, False, False, False, True]]


def test_make_cache_by_name_and_stats():
    import kvprune

    model = tiny_model("qwen2", "sdpa", num_hidden_layers=N_LAYERS)
    with pytest.raises(InvalidParameterError, match="takes no budget"):
        kvprune.make_cache(model, "lazyllm", 16)
    cache = kvprune.make_cache(model, "lazyllm", prune_layers=(1,), prune_ratios=(0.5,))
    assert isinstance(cache, kvprune.LazyCache)
    ids, mask = padded_batch([20, 9])
    _generate(model, ids, mask, cache, 3)
    stats = cache.stats()
    assert stats.tokens_seen == ids.shape[1] + 2 and stats.kv_bytes > 0 and len(stats.kept) == N_LAYERS
    # layers after the pruning layer hold fewer tokens than those before it
    assert int(stats.kept[-1].sum()) < int(stats.kept[0].sum())
    # a plain DynamicCache still runs the original forward on the same (prepared) model
    ref, _ = _generate(model, ids, mask, DynamicCache(), 3)
    assert ref.shape[0] == 2


def test_beam_search_and_sampling_without_pruning_match_baseline():
    model = tiny_model("llama", "sdpa", num_hidden_layers=N_LAYERS)
    ids, mask = padded_batch([12, 7])
    for kw in (dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, top_k=20)):
        outs = []
        for cache in (DynamicCache(), make_lazy_cache(model, LazyLLM(prune_ratios=(0.0, 0.0, 0.0)))):
            torch.manual_seed(7)
            outs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0,
                                       past_key_values=cache, **kw))
        assert torch.equal(outs[0], outs[1]), kw


def test_staircase_attention_equals_masked_sdpa():
    """Queries in position order against shuffled slots: block-wise attention over the slots up to each block's
    last position equals one masked SDPA call (padding, GQA)."""
    from kvprune.integrations.attention import sdpa_output, staircase_output

    torch.manual_seed(0)
    b, hq, hkv, d, n = 2, 4, 2, 8, 40
    kpos = torch.stack([torch.randperm(n), torch.randperm(n)])
    kpos[1, :3] = -1  # padding slots
    qpos = torch.stack([torch.arange(n - 19, n), torch.cat([torch.full((3,), -1), torch.arange(n - 16, n)])])
    allowed = (kpos[:, None, None, :] <= qpos[:, None, :, None]) & (kpos[:, None, None, :] >= 0)
    allowed |= kpos[:, None, None, :] == qpos[:, None, :, None]
    query, key, value = torch.randn(b, hq, 19, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    torch.testing.assert_close(staircase_output(query, key, value, allowed, qpos, kpos, 0.3),
                               sdpa_output(query, key, value, allowed, 0.3))


def test_revival_through_staircase_attention_matches_one_masked_call(monkeypatch):
    """Decoding steps that revive many tokens give the same tokens and logits with block-wise attention."""
    import kvprune.integrations.attention as attention

    model = _model()
    ids, mask = padded_batch([40, 29])
    policy = LazyLLM(prune_layers=(0, 1), prune_ratios=(0.7, 0.5), decode_ratios=(0.0, 0.2))
    runs = []
    for threshold in (10**9, 1):
        monkeypatch.setattr(attention, "STAIRCASE_MIN_QUERIES", threshold)
        runs.append(_generate(model, ids, mask, make_lazy_cache(model, policy), 4))
    assert torch.equal(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1])


def test_dense_causal_attention_equals_masked_sdpa():
    """Queries at some positions against slots holding every position once (shuffled): one causal kernel call
    over the scattered queries equals one masked SDPA call (GQA, two rows)."""
    from kvprune.integrations.attention import dense_causal_output, sdpa_output

    torch.manual_seed(1)
    b, hq, hkv, d, n = 2, 4, 2, 8, 30
    kpos = torch.stack([torch.randperm(n), torch.randperm(n)])
    qpos = torch.stack([torch.sort(torch.randperm(n)[:17]).values, torch.sort(torch.randperm(n)[:17]).values])
    allowed = (kpos[:, None, None, :] <= qpos[:, None, :, None])
    query, key, value = torch.randn(b, hq, 17, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    torch.testing.assert_close(dense_causal_output(query, key, value, qpos, kpos, 0.3, flash=False),
                               sdpa_output(query, key, value, allowed, 0.3))


@pytest.mark.parametrize("masked", [False, True])
def test_read_rows_equal_those_rows_of_masked_sdpa(masked):
    """Computing only the rows whose output is read (one per row) gives those rows of a full masked call, from
    positions alone (every slot visible) or from a given mask; the other rows are zero."""
    from kvprune.caches.contract import OrderedQueries
    from kvprune.integrations.attention import read_rows_output, sdpa_output

    torch.manual_seed(2)
    b, hq, hkv, d, n, q = 2, 4, 2, 8, 30, 12
    kpos = torch.stack([torch.randperm(n), torch.randperm(n)])
    qpos = torch.stack([torch.sort(torch.randperm(n)[:q]).values, torch.sort(torch.randperm(n)[:q]).values])
    allowed = (kpos[:, None, None, :] <= qpos[:, None, :, None])
    if masked:
        allowed &= torch.rand(b, 1, 1, n) > 0.3
        allowed |= kpos[:, None, None, :] == qpos[:, None, :, None]
    query, key, value = torch.randn(b, hq, q, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    read = torch.tensor([[q - 1], [4]])
    out = read_rows_output(query, key, value, allowed if masked else None, OrderedQueries(qpos, kpos, True, read), 0.3)
    full = sdpa_output(query, key, value, allowed, 0.3)
    for r in range(b):
        i = int(read[r, 0])
        torch.testing.assert_close(out[r, :, i], full[r, :, i])
        assert not out[r, :, [j for j in range(q) if j != i]].any()


def test_catch_up_through_dense_causal_attention_matches_one_masked_call(monkeypatch):
    """A decoding step that revives every deferred token (decode ratios 0) runs them through one causal kernel
    call, and at the last layer (where their output goes nowhere) computes only the newest token's row; tokens
    and logits equal the masked path's."""
    import kvprune.integrations.attention as attention

    model = _model()
    ids, mask = padded_batch([40])
    policy = LazyLLM(prune_layers=(0, 1), prune_ratios=(0.7, 0.5), decode_ratios=(0.0, 0.0))
    calls = []
    for name in ("dense_causal_output", "read_rows_output"):
        monkeypatch.setattr(attention, name, lambda *a, _f=getattr(attention, name), _n=name, **k:
                            calls.append(_n) or _f(*a, **k))
    runs = []
    for threshold in (10**9, 1):
        monkeypatch.setattr(attention, "STAIRCASE_MIN_QUERIES", threshold)
        runs.append(_generate(model, ids, mask, make_lazy_cache(model, policy), 4))
    # the catch-up took the dense path at the middle layers; at the last, only the newest token's row is computed
    # (layer 0 computed every token at the prompt; tokens pruned after it come back at every later layer)
    assert calls == ["dense_causal_output"] * (model.config.num_hidden_layers - 2) + ["read_rows_output"]
    assert torch.equal(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1])


def test_appends_reuse_buffer_room_and_count_it_as_metadata():
    """Decoding steps write into a buffer with free room (no reallocation per token); beam reordering
    replaces the tensors and the next append starts a new buffer; free room shows in the metadata bytes."""
    from kvprune.caches.stepwise import free_room_bytes

    model = _model()
    ids, mask = padded_batch([20])
    cache = make_lazy_cache(model, LazyLLM(prune_layers=(1,), prune_ratios=(0.5,)))
    with torch.no_grad():
        model(input_ids=ids, **with_cache(cache))
        storage = cache.layers[0].keys.untyped_storage().data_ptr()
        nxt = torch.ones((1, 1), dtype=torch.long)
        model(input_ids=nxt, **with_cache(cache))
        assert cache.layers[0].keys.untyped_storage().data_ptr() == storage, "appended in place"
        assert free_room_bytes(cache.layers[0]) > 0 and free_room_bytes(cache) > 0
        stats = cache.stats()
        held = sum(t.nbytes for t in (cache.hidden, cache.depth, cache.token_valid, cache.rope_pos))
        assert stats.metadata_bytes >= held + free_room_bytes(cache)
        cache.reorder_cache(torch.tensor([0]))
        assert free_room_bytes(cache.layers[0]) == 0, "a replaced tensor is no longer a view of the buffer"
        before = cache.layers[0].keys.clone()
        model(input_ids=nxt, **with_cache(cache))
    assert torch.equal(cache.layers[0].keys[:, :, : before.shape[2]], before)


def test_beam_search_with_pruning_keeps_at_most_once_per_beam():
    """Beam search reorders the rows (and the Aux Cache with them) between steps: every beam still computes
    each token at most once per layer, and the run is deterministic."""
    model = _model()
    ids, mask = padded_batch([18, 11])
    policy = LazyLLM(prune_layers=(0, 2), prune_ratios=(0.6, 0.5), decode_ratios=(0.2, 0.5))
    outs = []
    for _ in range(2):
        cache = make_lazy_cache(model, policy)
        outs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                                   num_beams=3, num_return_sequences=2, pad_token_id=0, do_sample=False,
                                   **with_cache(cache)))
        assert int(cache.computed.max()) <= 1
        assert cache.compute_stats()["computed"] < cache.compute_stats()["baseline"]
    assert torch.equal(outs[0], outs[1])
