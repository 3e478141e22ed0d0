"""Scores estimated without attention weights (SDPA, FlashAttention-2) equal those from eager weights."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch, tiny_model

import kvprune
from kvprune.integrations import attention
from kvprune.policies import POLICIES

pytestmark = pytest.mark.integration

CASES = [("a2sf", {"alpha": 0.5}), ("a2sf", {"alpha": 1.0}), ("h2o", {}), ("tova", {}), ("snapkv", {"window": 5})]


def _prefill_scores(attn, policy, params, budget=1000, block_elements=None, monkeypatch=None):
    model = tiny_model("qwen3", attn)
    if block_elements is not None:
        monkeypatch.setattr(attention, "BLOCK_ELEMENTS", block_elements)
    cache = kvprune.make_cache(model, policy, budget, **params)
    ids, mask = padded_batch([40, 23, 31])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        # a second chunk on top of the cache (multi-turn prefill) exercises decay of old scores
        ids2, mask2 = padded_batch([6, 6, 6], seed=2)
        model(input_ids=ids2, attention_mask=torch.cat([mask, mask2], 1), past_key_values=cache)
    return [layer.scores.masked_fill(~layer.valid, 0) for layer in cache.layers]


@pytest.mark.parametrize("policy,params", CASES)
def test_sdpa_scores_equal_eager_weights(policy, params):
    eager = _prefill_scores("eager", policy, params)
    sdpa = _prefill_scores("sdpa", policy, params)
    assert any(bool((s > 0).any()) for s in eager)
    for a, b in zip(eager, sdpa):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("policy,params", CASES[:2])
def test_blocked_column_sums_equal_one_block(policy, params, monkeypatch):
    """Query blocks of bounded memory (here 1-3 rows each) give the same column sums as one block."""
    whole = _prefill_scores("sdpa", policy, params)
    blocked = _prefill_scores("sdpa", policy, params, block_elements=3 * 4 * 50, monkeypatch=monkeypatch)
    for a, b in zip(whole, blocked):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a2sf_window_truncation_bound():
    """Prefill A2SF scores from the last w queries only differ from the full recursion by <= α^w/(1-α)."""
    alpha, w = 0.2, 8
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(1, 1, 1, 64, 64), -1) * torch.ones(64, 64).tril()
    weights = kvprune.A2SF(alpha=alpha).query_weights(64)[None]
    full = attention.reduce_probs(probs, weights)
    truncated = attention.reduce_probs(probs[..., -w:, :], weights[:, -w:])
    assert float((full - truncated).abs().max()) <= alpha**w / (1 - alpha)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention-2 needs a CUDA GPU")
def test_flash_attention_scores_and_tokens():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (pip install kvprune[flash])")
    model = tiny_model("llama", "sdpa").to("cuda", torch.float16)
    ids, _ = padded_batch([64])
    ids = ids.cuda()
    results = {}
    for backend in ("sdpa", "flash_attention_2"):
        cache = kvprune.make_cache(model, "a2sf", 32, backend=backend, alpha=0.5)
        out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, past_key_values=cache, pad_token_id=0)
        results[backend] = (out, [layer.scores.float().cpu() for layer in cache.layers])
    assert torch.equal(results["sdpa"][0], results["flash_attention_2"][0])
    for a, b in zip(results["sdpa"][1], results["flash_attention_2"][1]):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_newest_query_weighs_one(name):
    """A decode step's observation is its one row unweighted: every policy's newest query weighs 1."""
    policy = POLICIES[name]()
    for n in (1, 2, 7):
        w = policy.query_weights(n)
        assert w.shape == (n,) and float(w[-1]) == 1.0, (name, n, w)


@pytest.mark.parametrize("name,params", [("h2o", {}), ("a2sf", {"alpha": 0.3}), ("tova", {})])
def test_folded_decode_rows_equal_the_observation(name, params):
    """A decode step folds its softmax rows into the scores in one op (Policy.fold_rows, for a policy with a decay):
    the same as averaging them over the query heads (all heads, for TOVA) and calling update_scores; the scores are
    a strided view of a larger buffer, as in the cache."""
    from kvprune.policies import POLICIES

    policy = POLICIES[name](**params)
    b, hkv, g, s = 2, 3, 2, 17
    torch.manual_seed(0)
    rows = torch.softmax(torch.randn(b * hkv, g, s), -1)
    buf = torch.rand(b, hkv, s + 5)
    expected = buf[..., :s].clone()
    obs = rows.mean(1).view(b, hkv, s)
    if policy.shared_across_heads:
        obs = obs.mean(1, keepdim=True).expand(b, hkv, s)
    expected = policy.update_scores(expected, obs, 1).clone()
    policy.fold_rows(buf[..., :s], rows)
    torch.testing.assert_close(buf[..., :s], expected)


@pytest.mark.parametrize("name", ["h2o", "a2sf", "tova"])
def test_decode_steps_score_alike_folded_or_not(name, monkeypatch):
    """Scores and kept tokens after a prompt and decode steps are the same whether the steps fold their rows into
    the scores or hand the averaged observation to finish (the general path)."""
    from kvprune.caches.layer import PruningLayer

    model = tiny_model()
    ids, _ = padded_batch([24, 24])
    runs, folded = [], []
    real = PruningLayer.fold_row
    for fold in (True, False):
        monkeypatch.setattr(PruningLayer, "fold_row",
                            (lambda self, rows: folded.append(real(self, rows)) or folded[-1]) if fold
                            else (lambda self, rows: False))
        cache = kvprune.make_cache(model, name, 12)
        with torch.no_grad():
            nxt = model(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
            for _ in range(6):
                nxt = model(input_ids=nxt, past_key_values=cache).logits[:, -1:].argmax(-1)
        runs.append([(layer.positions.sort(-1).values, layer.scores.gather(-1, layer.positions.argsort(-1)))
                     for layer in cache.layers])
    assert folded and all(folded)  # every decode step of every layer folded in the first run
    for (pa, sa), (pb, sb) in zip(*runs):
        assert torch.equal(pa, pb)
        torch.testing.assert_close(sa, sb)


def test_an_update_scores_override_wins_over_an_inherited_decay():
    """A subclass of H2O (decay 1) that overrides update_scores keeps its own rule at decode steps: the fold, which
    implements the decay, is not taken for it."""
    from dataclasses import dataclass

    from kvprune.policies.h2o import H2O

    @dataclass
    class Doubling(H2O):
        name = "h2o_doubling_test"

        def update_scores(self, scores, obs, n_new):
            return scores.add_(obs, alpha=2.0)

    model = tiny_model()
    ids, _ = padded_batch([24])
    kept = {}
    try:
        for policy in (H2O(recent=0.5), Doubling(recent=0.5)):
            cache = kvprune.make_cache(model, policy, 12)
            with torch.no_grad():
                nxt = model(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
                for _ in range(4):
                    nxt = model(input_ids=nxt, past_key_values=cache).logits[:, -1:].argmax(-1)
            kept[policy.name] = cache.layers[0].scores.sort(-1).values
    finally:
        POLICIES.pop("h2o_doubling_test", None)  # other tests list the registered names
    # every score of the doubling rule is twice H2O's (the same tokens are kept: scaling does not reorder them)
    torch.testing.assert_close(kept["h2o_doubling_test"], 2 * kept["h2o"])
