"""Each policy's keep-set equals the slow reference written from its paper's equation."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch, tiny_model
from reference import Reference, kept_positions, position_ids_from_mask

import kvprune
from kvprune.policies import build_policy

CASES = {
    "a2sf_0.3": ("a2sf", {"alpha": 0.3}),
    "a2sf_1.0": ("a2sf", {"alpha": 1.0}),
    "a2sf_sink_recent": ("a2sf", {"alpha": 0.5, "n_sink": 1, "recent": 2}),
    "h2o": ("h2o", {}),
    "tova": ("tova", {}),
    "snapkv": ("snapkv", {"window": 4, "kernel_size": 3}),
    "knorm": ("knorm", {}),
    "random": ("random", {"seed": 3}),
    "streaming": ("streaming", {"n_sink": 2}),
    "observed": ("observed", {}),
    "observed_recent": ("observed", {"recent": 2}),
    "keydiff": ("keydiff", {}),
    "keydiff_sink": ("keydiff", {"n_sink": 1}),
}
BUDGET = 8
STEPS = 10


def _run_both(policy_name, params, arch="llama", lengths=(14, 9)):
    """Drive kvprune (eager backend) and the reference in lockstep; yield both after each forward."""
    ours = tiny_model(arch, "eager", dtype=torch.float64)
    theirs = tiny_model(arch, "eager", dtype=torch.float64)
    cache = kvprune.make_cache(ours, policy_name, BUDGET, **params)
    ref = Reference(theirs, build_policy(policy_name, **params), BUDGET)
    ids, mask = padded_batch(list(lengths))
    pos = position_ids_from_mask(mask)
    for step in range(STEPS + 1):
        with torch.no_grad():
            logits = ours(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits
            ref_logits = ref.forward(ids, mask, pos)
        yield step, cache, ref, logits, ref_logits
        ids = logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(ids)], 1)
        pos = pos[:, -1:] + 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_keep_sets_match_reference(case):
    name, params = CASES[case]
    evicted = 0
    for step, cache, ref, logits, ref_logits in _run_both(name, params):
        # attention over the kept set == attention over all tokens with the evicted ones masked
        torch.testing.assert_close(logits[:, -1], ref_logits[:, -1], atol=1e-6, rtol=1e-5)  # eager softmax is float32
        for i, layer in enumerate(cache.layers):
            assert layer.physical_length <= BUDGET
            for r in range(2):
                for h in range(layer.keys.shape[1]):
                    assert kept_positions(layer, r, h) == ref.kept[i][r][h], (step, i, r, h)
                    for p, sc in zip(layer.positions[r, h].tolist(), layer.scores[r, h].tolist()):
                        if p in ref.scores[i][r][h]:
                            assert sc == pytest.approx(ref.scores[i][r][h][p], rel=1e-5, abs=1e-9)
        evicted = sum(cache.stats().evictions)
    assert evicted > 0  # the budget really forced evictions


def test_a2sf_alpha_one_is_h2o():
    """A2SF with alpha = 1 and H2O's half-budget recent window keep the same tokens."""
    a = list(_run_both("a2sf", {"alpha": 1.0, "recent": 0.5}))
    b = list(_run_both("h2o", {}))
    for (_, ca, *_), (_, cb, *_) in zip(a[-1:], b[-1:]):
        for la, lb in zip(ca.layers, cb.layers):
            assert torch.equal(la.positions, lb.positions)
            assert torch.equal(la.valid, lb.valid)


@pytest.mark.parametrize("evict_every", [1, 3])
def test_streaming_keeps_the_newest_window_at_any_length(evict_every):
    """StreamingLLM holds its sinks and exactly the newest ``budget - n_sink`` tokens however long the stream:
    past ~2K tokens ages tie on the 10-bit ranking grid, so the window must not be decided by an age score."""
    model = tiny_model(max_position_embeddings=8192)
    budget, n_sink, n = 12, 4, 5000
    cache = kvprune.make_cache(model, "streaming", budget, n_sink=n_sink, evict_every=evict_every)
    ids = torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nxt = model(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        for step in range(7):
            seen = n + step
            if step % evict_every == 0:  # the prompt and every k-th step after it evict to exactly the budget
                want = set(range(n_sink)) | set(range(seen - (budget - n_sink), seen))
                for layer in cache.layers:
                    for r in range(2):
                        for h in range(layer.keys.shape[1]):
                            assert kept_positions(layer, r, h) == want, (step, r, h)
            nxt = model(input_ids=nxt, past_key_values=cache).logits[:, -1:].argmax(-1)


def test_streaming_refuses_recent():
    with pytest.raises(kvprune.InvalidParameterError, match="recent"):
        kvprune.build_policy("streaming", recent=8)
