"""Property-based invariants of the pruning cache (hypothesis), on a float64 tiny model."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import padded_batch, tiny_model
from hypothesis import given
from hypothesis import strategies as st
from reference import kept_positions, position_ids_from_mask

import kvprune

pytestmark = pytest.mark.integration

POLICY_PARAMS = {
    "a2sf": st.fixed_dictionaries({"alpha": st.sampled_from([0.1, 0.5, 1.0]), "n_sink": st.integers(0, 2)}),
    "h2o": st.fixed_dictionaries({"recent": st.sampled_from([0.25, 0.5, 2])}),
    "tova": st.fixed_dictionaries({"n_sink": st.integers(0, 2)}),
    "snapkv": st.fixed_dictionaries({"window": st.integers(1, 4), "kernel_size": st.sampled_from([1, 3, 5])}),
    "knorm": st.fixed_dictionaries({"recent": st.integers(0, 3)}),
    "random": st.fixed_dictionaries({"seed": st.integers(0, 5)}),
    "streaming": st.fixed_dictionaries({"n_sink": st.integers(0, 4)}),
}


@st.composite
def scenarios(draw):
    name = draw(st.sampled_from(sorted(POLICY_PARAMS)))
    params = draw(POLICY_PARAMS[name])
    policy = kvprune.build_policy(name, **params)
    if draw(st.booleans()):
        budget = draw(st.integers(policy.min_budget(), policy.min_budget() + 12))
    else:
        budget = draw(st.sampled_from([0.3, 0.5, 0.8]))
    lengths = draw(st.lists(st.integers(1, 18), min_size=1, max_size=3))
    steps = draw(st.integers(0, 6))
    backend = draw(st.sampled_from(["eager", "sdpa"]))
    every = draw(st.sampled_from([1, 1, 3]))  # evict_every: a block of 3 at every third token
    if every != 1:
        params = {**params, "evict_every": every}
    return name, params, budget, lengths, steps, backend


@functools.lru_cache(maxsize=None)
def _model(backend):
    return tiny_model("llama", backend, dtype=torch.float64)


def _run(name, params, budget, ids, mask, steps, backend, check=None):
    """Greedy decode with a kvprune cache; ``check(cache, written)`` runs after every forward."""
    model = _model(backend)
    cache = kvprune.make_cache(model, name, budget, **params)
    written = {}
    for layer in cache.layers:
        orig = layer.update

        def record(k, v, *a, _layer=layer, _orig=orig, **kw):
            for j in range(k.shape[2]):
                written[(_layer.layer_idx, _layer.n_seen + j)] = (k[:, :, j].clone(), v[:, :, j].clone())
            return _orig(k, v, *a, **kw)

        layer.update = record
    pos = position_ids_from_mask(mask)
    tokens = []
    for _ in range(steps + 1):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits
        if check:
            check(cache, written)
        ids = logits[:, -1:].argmax(-1)
        tokens.append(ids)
        mask = torch.cat([mask, torch.ones_like(ids)], 1)
        pos = pos[:, -1:] + 1
    return torch.cat(tokens, 1), cache


def _check_layer_invariants(cache, written, stored=None):
    """Budget, protection, order and content of every layer; ``stored(layer, k, v)`` is what a layer holds for a
    written key/value vector (default: the vectors themselves, bit for bit)."""
    for layer in cache.layers:
        caps = layer.capacity()
        slack = layer.evict_every - 1  # evict_every=k: up to k - 1 slots over between block evictions
        assert layer.physical_length <= int(caps.max()) + slack, "physical size <= budget"
        recent = layer.policy.recent_tokens(caps).clamp(min=1)
        b, h, s = layer.positions.shape
        for r in range(b):
            n_valid = int(layer.n_valid[r])
            must = {k for k in range(n_valid) if k < layer.policy.n_sink or k >= n_valid - int(recent[r])}
            for hh in range(h):
                v = layer.valid[r, hh]
                pos = layer.positions[r, hh][v]
                assert len(set(pos.tolist())) == len(pos), "kept positions unique"
                if layer.in_position_order:  # a decode eviction moves the newest slot into the victim's place
                    assert bool((pos[1:] > pos[:-1]).all()), "slots in position order"
                assert must <= set(layer.ranks[r, hh][v].tolist()), "protected tokens kept"
                assert int(v.sum()) <= int(caps[r]) + slack, "row within its own budget"
                for slot in torch.nonzero(v).flatten().tolist():
                    k, val = written[(layer.layer_idx, int(layer.positions[r, hh, slot]))]
                    k, val = (k[r, hh], val[r, hh]) if stored is None else stored(layer, k[r, hh], val[r, hh])
                    assert torch.equal(layer.keys[r, hh, slot], k), "kept K bit-identical"
                    assert torch.equal(layer.values[r, hh, slot], val), "kept V bit-identical"


def _kept_ranks(cache, r):
    return [[sorted(layer.ranks[r, h][layer.valid[r, h]].tolist()) for h in range(layer.keys.shape[1])] for layer in cache.layers]


@given(scenarios())
def test_cache_invariants(scenario):
    name, params, budget, lengths, steps, backend = scenario
    ids, mask = padded_batch(lengths)
    _run(name, params, budget, ids, mask, steps, backend, check=_check_layer_invariants)


@given(scenarios())
def test_rows_independent_and_deterministic(scenario):
    check_rows_independent_and_deterministic(scenario)


def check_rows_independent_and_deterministic(scenario):
    """Two runs agree, and each row of the batch equals the row run alone (tokens and kept ranks)."""
    name, params, budget, lengths, steps, backend = scenario
    ids, mask = padded_batch(lengths)
    tokens, cache = _run(name, params, budget, ids, mask, steps, backend)
    again, cache2 = _run(name, params, budget, ids, mask, steps, backend)
    assert torch.equal(tokens, again)
    for la, lb in zip(cache.layers, cache2.layers):
        assert torch.equal(la.positions, lb.positions) and torch.equal(la.keys, lb.keys)
    for r, n in enumerate(lengths):
        alone_ids = ids[r : r + 1, ids.shape[1] - n :]
        alone, alone_cache = _run(name, params, budget, alone_ids, torch.ones_like(alone_ids), steps, backend)
        assert torch.equal(tokens[r : r + 1], alone), f"row {r} differs from the row run alone"
        assert _kept_ranks(cache, r) == _kept_ranks(alone_cache, 0)


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "tova"])
def test_prefill_only_compresses_once_then_grows(policy):
    """prefill_only: the prompt is cut to the budget once; decode steps keep every new token and evict nothing."""
    from conftest import generate_logits

    model = tiny_model("llama", "sdpa")
    ids, mask = padded_batch([24, 17])
    params = {"window": 4} if policy == "snapkv" else {}
    cache = kvprune.make_cache(model, policy, 8, prefill_only=True, **params)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    after_prefill = [kept_positions(layer, r, h) for layer in cache.layers for r in range(2) for h in range(layer.keys.shape[1])]
    assert all(len(k) == 8 for k in after_prefill)
    steps = 5
    cache2 = kvprune.make_cache(model, policy, 8, prefill_only=True, **params)
    tokens, _ = generate_logits(model, ids, mask, cache2, steps, min_new_tokens=steps)
    width = ids.shape[1]
    i = 0
    for layer in cache2.layers:
        assert layer.evictions == cache.layers[layer.layer_idx].evictions, "nothing evicted after the prefill"
        for r in range(2):
            for h in range(layer.keys.shape[1]):
                new = set(range(width, width + steps - 1))  # the last generated token is never fed back
                assert kept_positions(layer, r, h) == after_prefill[i] | new
                i += 1
    with pytest.raises(kvprune.InvalidParameterError, match="prefill_only"):
        kvprune.make_cache(model, "lazyllm", prefill_only=True)


@given(st.floats(1e-4, 0.9999), st.integers(0, 10**8), st.integers(1, 64))
def test_ratio_budget_int_path_matches_the_tensor_path(ratio, n_seen, floor):
    """The decode path's int capacity (rows that all saw ``n_seen`` tokens) is the per-row tensor rule's."""
    from kvprune.caches.budget import Budget

    budget = Budget(ratio=ratio)
    assert budget.slots_for(n_seen, floor) == int(budget.slots(torch.tensor([n_seen]), floor)[0])


def test_reset_and_new_prompts_free_the_shared_decode_buffers():
    """Decode-size buffers shared by the layers are freed with the last layer that uses them: after ``reset``
    the cache holds nothing, and a new prompt's eviction holds one set of them, not two."""
    from kvprune.caches.accounting import held_bytes

    model = tiny_model()
    cache = kvprune.make_cache(model, "h2o", 16)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nxt = model(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        held = held_bytes(cache)
        for _ in range(3):
            nxt = model(input_ids=nxt, past_key_values=cache).logits[:, -1:].argmax(-1)
    assert all(layer.generation is cache.layers[0].generation is not None for layer in cache.layers)
    cache.reset()
    assert held_bytes(cache) == 0
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    assert held_bytes(cache) == held


@pytest.mark.parametrize("every", [1, 3])
def test_layers_on_several_devices_keep_buffers_of_their_own(every):
    """Layers whose keys live on different devices (a split ``device_map``) share no buffers: once a second
    device is seen, a layer holding a shared slice moves to buffers of its own at its next step, with the same
    logits and keep-sets as a cache that never shared (a CPU box has one device, so the second is declared)."""
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    runs = []
    for split in (False, True):
        cache = kvprune.make_cache(model, "h2o", 16, evict_every=every)
        logits = []
        with torch.no_grad():
            nxt = model(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
            assert all(layer.generation is not None for layer in cache.layers)
            if split:
                cache.layers[0].stacked.register(torch.device("meta"))
            for _ in range(7):
                out = model(input_ids=nxt, past_key_values=cache).logits[:, -1:]
                logits.append(out)
                nxt = out.argmax(-1)
        assert all((layer.generation is None) == split for layer in cache.layers)
        runs.append((torch.cat(logits, 1), [kept_positions(layer, r, h) for layer in cache.layers
                                            for r in range(2) for h in range(layer.keys.shape[1])]))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
