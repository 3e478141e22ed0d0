"""``evict_every=k``: one-token steps evict a block at every k-th of them; the bound and the equivalences that must hold."""

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
    for step, _ in enumerate(_steps(model, cache, ids, mask, 17)):  # step 0: the prompt
        for layer in cache.layers:
            caps = layer.capacity()
            held = layer.valid.sum(-1)  # [B, H] real tokens held
            assert bool((held <= caps[:, None] + k - 1).all())
            if step % k == 0:
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
    for step, _ in enumerate(zip(_forced(model, one, ids, mask, 22), _forced(model, block, ids, mask, 22))):
        if step % k == 0:
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
@pytest.mark.parametrize("every", [1, 4])
def test_few_over_fast_path_decides_as_the_general_path(method, params, lengths, every, monkeypatch):
    """A decode step a few slots over a token budget (one, or ``evict_every`` at every k-th token) takes a few-op
    path; with it switched off, the general sort-and-gather path keeps the same tokens and gives the same logits
    at every step."""
    from kvprune.caches.layer import PruningLayer

    model = tiny_model()
    ids, mask = padded_batch(lengths)
    runs, fast_evictions = [], []
    original = PruningLayer._evict_over

    def counted(self):
        before = self.evictions
        done = original(self)
        fast_evictions.append(done and self.evictions > before)
        return done

    for fast in (True, False):
        monkeypatch.setattr(PruningLayer, "_evict_over", counted if fast else (lambda self: False))
        cache = kvprune.make_cache(model, method, 12, evict_every=every, **params)
        steps = [(logits, _kept(cache)) for logits in _steps(model, cache, ids, mask, 15)]
        runs.append(steps)
    assert any(fast_evictions), "the fast path evicted at some step"
    for (la, ka), (lb, kb) in zip(*runs):
        assert ka == kb
        torch.testing.assert_close(la, lb)


def _chunked(model, cache, ids, mask, steps):
    """Prefill, ``steps`` greedy one-token steps, a 5-token chunk, then ``steps`` more; yields logits and keep-sets."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    chunk = torch.randint(3, model.config.vocab_size, (ids.shape[0], 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **with_cache(cache)).logits[:, -1:]
        for part in range(3):
            for _ in range(steps if part != 1 else 1):
                nxt = logits.argmax(-1) if part != 1 else chunk
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                pos = pos[:, -1:] + torch.arange(1, nxt.shape[1] + 1)
                logits = model(input_ids=nxt, attention_mask=mask, position_ids=pos, **with_cache(cache)).logits[:, -1:]
                yield logits, _kept(cache)


@pytest.mark.parametrize("method,params", [("h2o", {}), ("tova", {"recent": 3}), ("streaming", {"n_sink": 2}),
                                           ("keydiff", {"n_sink": 1}), ("a2sf", {"n_sink": 2})])
@pytest.mark.parametrize("lengths", [[30], [30, 21], [30, 5]])
@pytest.mark.parametrize("budget", [12, 0.4])
@pytest.mark.parametrize("every", [1, 4])
def test_decode_evictions_of_all_layers_at_once_decide_as_each_layer_alone(method, params, lengths, budget, every):
    """Decode evictions are chosen for every layer together once the last layer has attended, and the newest slot
    moves into the victim's place (slots leave position order). Each layer evicting alone at once, and the general
    sort-and-gather path (which puts slots back in position order, here for a multi-token chunk between decode
    steps), keep the same tokens and give the same logits; after every forward each layer holds its budget
    (a token count, or a ratio of the tokens seen: one over at every other step). A row shorter than the budget
    (``[30, 5]``) keeps padding slots for a while: they go first, and count as no eviction. With
    ``evict_every=4`` a step evicts 4 slots at once (the chunk 5 more), and the newest survivors fill the holes."""
    from kvprune.caches.layer import PruningLayer

    model = tiny_model()
    ids, mask = padded_batch(lengths)
    runs = []
    for mode in ("together", "alone", "general"):
        cache = kvprune.make_cache(model, method, budget, evict_every=every, **params)
        if mode == "alone":
            for layer in cache.layers:
                layer.deferred = None
        original = PruningLayer._evict_over
        try:
            if mode == "general":
                PruningLayer._evict_over = lambda self: False
            steps = list(_chunked(model, cache, ids, mask, 6))
        finally:
            PruningLayer._evict_over = original
        for layer in cache.layers:
            assert bool((layer.kept() <= layer.capacity()[:, None] + every - 1).all()) and not layer.eviction_due
            assert layer.evicted() == int((layer.n_valid[:, None] - layer.kept()).sum())  # real tokens only
        if mode == "together" and (isinstance(budget, int) or len(lengths) == 1):  # rows of one capacity
            assert not all(layer.in_position_order for layer in cache.layers), "decode evictions moved slots"
        runs.append(steps)
    for together, alone, general in zip(*runs):
        assert together[1] == alone[1] == general[1]
        torch.testing.assert_close(together[0], alone[0])
        torch.testing.assert_close(together[0], general[0])


def test_a_forward_that_stops_early_leaves_no_eviction_behind():
    """A forward that raises after some layers handed over their decode eviction: the next use of such a layer
    evicts first (the budget holds before it attends again), and ``reset`` forgets what was due."""
    model = tiny_model()
    ids, _ = padded_batch([20])
    cache = kvprune.make_cache(model, "h2o", 8)
    with torch.no_grad():
        model(input_ids=ids, **with_cache(cache))
        nxt = ids[:, -1:]

        def stop(*_):
            raise RuntimeError("stopped")

        hook = model.model.layers[-1].self_attn.register_forward_pre_hook(stop)
        with pytest.raises(RuntimeError, match="stopped"):
            model(input_ids=nxt, **with_cache(cache))
        hook.remove()
        first = cache.layers[0]
        assert first.eviction_due and first.keys.shape[-2] == 9  # handed over, not dropped: the last layer never ran
        first.select_rows(torch.tensor([0]))  # what beam search would do between steps: evicts first
        assert not first.eviction_due and first.keys.shape[-2] == 8
        for then in ("forward", "reset"):
            hook = model.model.layers[-1].self_attn.register_forward_pre_hook(stop)
            with pytest.raises(RuntimeError, match="stopped"):
                model(input_ids=nxt, **with_cache(cache))
            hook.remove()
            assert first.eviction_due
            if then == "forward":  # the first layer's next update evicts before appending
                model(input_ids=nxt, **with_cache(cache))
                assert all(layer.keys.shape[-2] == 8 and not layer.eviction_due for layer in cache.layers)
        cache.reset()
        assert not first.deferred.due and not first.eviction_due
        model(input_ids=ids, **with_cache(cache))
        for _ in range(3):
            model(input_ids=nxt, **with_cache(cache))
            assert all(layer.keys.shape[-2] == 8 for layer in cache.layers)


@pytest.mark.parametrize("lengths", [[30], [30, 21]])
def test_tova_observes_only_the_steps_that_evict(lengths, monkeypatch):
    """TOVA's scores are its newest observation, so between amortised evictions a step observes nothing (the
    explicit attention row is skipped); it keeps what observing at every step keeps, with the same logits."""
    from kvprune.policies.tova import TOVA

    model = tiny_model()
    ids, mask = padded_batch(lengths)
    runs, observed = [], []
    real, real_fold = TOVA.update_scores, TOVA.fold_rows

    def counting(self, scores, obs, n_new):  # an observation reaches the policy
        observed[-1] += obs is not None
        return real(self, scores, obs, n_new)

    def counting_fold(self, scores, rows, decay=None):  # or a decode step's rows, folded in directly
        observed[-1] += 1
        return real_fold(self, scores, rows, decay)

    monkeypatch.setattr(TOVA, "update_scores", counting)
    monkeypatch.setattr(TOVA, "fold_rows", counting_fold)
    for rests in (True, False):
        monkeypatch.setattr(TOVA, "replaces_scores", rests)
        observed.append(0)
        cache = kvprune.make_cache(model, "tova", 12, evict_every=4, recent=2)
        runs.append([(logits, _kept(cache)) for logits in _steps(model, cache, ids, mask, 12)])
    layers = model.config.num_hidden_layers
    assert observed == [layers * (1 + 3), layers * (1 + 12)]  # the prompt, then steps 4, 8, 12 only
    for (la, ka), (lb, kb) in zip(*runs):
        assert ka == kb
        torch.testing.assert_close(la, lb)


@pytest.mark.parametrize("lengths", [[1, 2], [5, 12]])
def test_a_padded_row_evicts_at_the_steps_it_evicts_alone(lengths):
    """The block schedule counts one-token steps since the prompt, not tokens seen (which include a batch's left
    padding): each row of a padded batch keeps, at every step, what it keeps run alone, with the same tokens."""
    model = tiny_model()
    ids, mask = padded_batch(lengths)
    batch = kvprune.make_cache(model, "h2o", 0.3, evict_every=3, recent=0.25)
    steps = [(logits.argmax(-1), _kept(batch)) for logits in _steps(model, batch, ids, mask, 7)]
    for r, n in enumerate(lengths):
        pad = ids.shape[1] - n  # the row's positions in the batch are shifted by its padding
        alone_ids = ids[r : r + 1, pad:]
        alone = kvprune.make_cache(model, "h2o", 0.3, evict_every=3, recent=0.25)
        for (tok, kept), logits in zip(steps, _steps(model, alone, alone_ids, torch.ones_like(alone_ids), 7)):
            assert int(tok[r]) == int(logits.argmax(-1)[0])
            in_batch = [[[p - pad for p in head] for head in layer[r]] for layer in kept]
            assert in_batch == [layer[0] for layer in _kept(alone)]


def test_a_subclass_that_overrides_the_rule_observes_every_step():
    """A TOVA subclass whose update accumulates does not inherit TOVA's promise that its scores are only the newest
    observation: with evict_every=4 it still observes every step (resting would silently drop observations)."""
    from dataclasses import dataclass

    from kvprune.policies.tova import TOVA

    seen = []

    @dataclass
    class AccumulatingTOVA(TOVA):
        name = "tova_accumulating_test"

        def update_scores(self, scores, obs, n_new):
            seen.append(obs is not None)
            return scores.add_(obs)

    from kvprune.policies import POLICIES

    try:
        assert TOVA().rests_between_evictions and not AccumulatingTOVA().rests_between_evictions
        model = tiny_model()
        ids, mask = padded_batch([30])
        cache = kvprune.make_cache(model, AccumulatingTOVA(recent=2), 12, evict_every=4)
        list(_steps(model, cache, ids, mask, 12))
    finally:
        POLICIES.pop("tova_accumulating_test", None)  # other tests list the registered names
    assert sum(seen) == model.config.num_hidden_layers * (1 + 12)  # the prompt, then every one of the 12 steps
