"""``evict_every=k``: one-token steps evict a block every k tokens; the bound and the equivalences that must hold."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch, tiny_model
from reference import kept_positions

import kvprune
from kvprune.errors import InvalidParameterError
from kvprune.integrations.compat import with_cache

pytestmark = pytest.mark.integration


def _steps(model, cache, ids, mask, n):
    """Prefill, then n greedy one-token steps; yields after each step."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **with_cache(cache)).logits
        yield logits[:, -1]
        for _ in range(n):
            nxt = logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            pos = pos[:, -1:] + 1
            logits = model(input_ids=nxt, attention_mask=mask, position_ids=pos, **with_cache(cache)).logits
            yield logits[:, -1]


def _kept(cache):
    return [[[sorted(kept_positions(layer, r, h)) for h in range(layer.keys.shape[1])] for r in range(layer.keys.shape[0])]
            for layer in cache.layers]


@pytest.mark.parametrize("k", [2, 5, 8])
@pytest.mark.parametrize("budget", [12, 0.5])
@pytest.mark.parametrize("method", ["h2o", "a2sf", "tova", "snapkv", "knorm", "streaming", "keydiff", "random"])
def test_bound_holds_and_budget_is_met_every_kth_token(method, budget, k):
    model = tiny_model()
    ids, mask = padded_batch([30, 21])
    params = {"window": 4} if method == "snapkv" else {}
    cache = kvprune.make_cache(model, method, budget, evict_every=k, **params)
    for _ in _steps(model, cache, ids, mask, 17):
        for layer in cache.layers:
            caps = layer.capacity()
            held = layer.valid.sum(-1)  # [B, H] real tokens held
            assert bool((held <= caps[:, None] + k - 1).all())
            if cache.get_seq_length() % k == 0:
                assert bool((held <= caps[:, None]).all())


def _forced(model, cache, ids, mask, prompt: int):
    """Prefill the first ``prompt`` columns, then teacher-force the rest one token per step; yields after each."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], position_ids=pos[:, :prompt], **with_cache(cache))
        yield
        for t in range(prompt, ids.shape[1]):
            model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                  **with_cache(cache))
            yield


@pytest.mark.parametrize("k", [3, 8])
@pytest.mark.parametrize(("method", "params", "layers"),
                         [("streaming", {"n_sink": 2}, None), ("random", {"seed": 1}, None), ("knorm", {}, 1)])
def test_order_independent_policies_keep_what_k1_keeps(method, params, layers, k):
    """Scores that never change once written and no recent window: on the same token stream, evicting a block at
    every k-th token keeps exactly what evicting one per step keeps. StreamingLLM's age and the random hash hold
    at every layer; K-norm at layer 0 only, whose keys do not depend on what the cache held."""
    model = tiny_model()
    ids, mask = padded_batch([40, 31])
    one = kvprune.make_cache(model, method, 10, **params)
    block = kvprune.make_cache(model, method, 10, evict_every=k, **params)
    checked = 0
    for _ in zip(_forced(model, one, ids, mask, 22), _forced(model, block, ids, mask, 22)):
        if one.get_seq_length() % k == 0:
            assert _kept(one)[:layers] == _kept(block)[:layers]
            checked += 1
    assert checked >= 2


def test_k1_is_the_default_and_bad_values_are_refused():
    model = tiny_model()
    assert kvprune.make_cache(model, "h2o", 8).evict_every == 1
    for bad in (0, -1, 1.5, True, 10**6):
        with pytest.raises(InvalidParameterError, match="evict_every is an integer number of decode steps"):
            kvprune.make_cache(model, "h2o", 8, evict_every=bad)
    with pytest.raises(InvalidParameterError, match="not to LazyLLM or SpAtten"):
        kvprune.make_cache(model, "lazyllm", evict_every=4)


@pytest.mark.parametrize("method,params", [
    ("h2o", {}), ("a2sf", {"n_sink": 2}), ("tova", {"recent": 3}), ("snapkv", {"window": 4}), ("knorm", {}),
    ("streaming", {"n_sink": 2}), ("keydiff", {"n_sink": 1}), ("random", {}), ("observed", {"recent": 0.25}),
])
@pytest.mark.parametrize("lengths", [[30], [30, 21]])
def test_one_over_fast_path_decides_as_the_general_path(method, params, lengths, monkeypatch):
    """A decode step one slot over a token budget (every slot real) takes a few-op path; with it switched off,
    the general sort-and-gather path keeps the same tokens and gives the same logits at every step."""
    from kvprune.caches.layer import PruningLayer

    model = tiny_model()
    ids, mask = padded_batch(lengths)
    runs, fast_evictions = [], []
    original = PruningLayer._evict_one_over

    def counted(self):
        before = self.evictions
        done = original(self)
        fast_evictions.append(done and self.evictions > before)
        return done

    for fast in (True, False):
        monkeypatch.setattr(PruningLayer, "_evict_one_over", counted if fast else (lambda self: False))
        cache = kvprune.make_cache(model, method, 12, **params)
        steps = [(logits, _kept(cache)) for logits in _steps(model, cache, ids, mask, 15)]
        runs.append(steps)
    assert any(fast_evictions), "the fast path evicted at some step"
    for (la, ka), (lb, kb) in zip(*runs):
        assert ka == kb
        torch.testing.assert_close(la, lb)
