"""A row in a batch equals the row alone, for every method, on real weights and prompts with repeated tokens.

Repeated tokens make exact score ties in exact arithmetic that float computation breaks differently in a
batch and alone (K-norm's norms, attention sums); kvprune ranks on a coarser grid with a position
tie-break (:func:`kvprune.policies.base.rank_grid`), so both runs take the same decisions.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import kept_positions

import kvprune
from kvprune.integrations.compat import with_cache
from kvprune.models.llama2c import default_stories260k_path, load_llama2c
from kvprune.policies import POLICIES

FIXTURE = default_stories260k_path()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not FIXTURE.is_file(), reason=f"stories260K fixture absent at {FIXTURE}"),
]
EVICTING = sorted(name for name in POLICIES if name != "full")
PARAMS = {"snapkv": {"window": 8}}  # small budgets need a small observation window
VOCAB = 512


@functools.lru_cache(maxsize=1)
def _model():
    return load_llama2c(FIXTURE, attn_implementation="sdpa")


def repeated_prompt(length: int, seed: int) -> torch.Tensor:
    """BOS, then a few short motifs repeated with random tokens between them (as phrases recur in text)."""
    g = torch.Generator().manual_seed(seed)
    motifs = [torch.randint(3, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g) for _ in range(3)]
    out = [torch.tensor([1])]
    n = 1
    while n < length:
        if bool(torch.rand(1, generator=g) < 0.6):
            piece = motifs[int(torch.randint(0, 3, (1,), generator=g))]
        else:
            piece = torch.randint(3, VOCAB, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g)
        out.append(piece)
        n += len(piece)
    return torch.cat(out)[:length]


def _batch(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


def _generate(method: str, budget, prompts: list[torch.Tensor], steps: int, **params):
    model = _model()
    ids, mask = _batch(prompts)
    cache = kvprune.make_cache(model, method, budget, **params)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, pad_token_id=0, **with_cache(cache))
    return out[:, ids.shape[1] :], cache


def _kept(cache, row: int) -> list | None:
    """Kept positions per (layer, KV head) of ``row`` (positions relative to the row's first real token)."""
    if not isinstance(cache, kvprune.PruningCache):
        return None
    return [[sorted(kept_positions(layer, row, h)) for h in range(layer.keys.shape[1])] for layer in cache.layers]


def _shifted(kept: list, offset: int) -> list:
    return [[[p - offset for p in head] for head in layer] for layer in kept]


def assert_rows_independent(method: str, budget, lengths: list[int], seed: int, steps: int, **params) -> None:
    prompts = [repeated_prompt(n, seed + i) for i, n in enumerate(lengths)]
    batched, cache = _generate(method, budget, prompts, steps, **params)
    width = max(lengths)
    for i, p in enumerate(prompts):
        alone, cache1 = _generate(method, budget, [p], steps, **params)
        assert torch.equal(batched[i], alone[0]), (method, budget, i)
        kept = _kept(cache, i)
        if kept is not None:  # the same tokens kept, in every layer and head (positions count padding in a batch)
            assert _shifted(kept, width - len(p)) == _kept(cache1, 0), (method, budget, i)


@pytest.mark.parametrize(("method", "budget"), [("snapkv", 0.5), ("knorm", 32), ("knorm", 0.5)])
def test_reported_batches(method, budget):
    """The reported cases: prompts of 40, 97 and 150 tokens, 48 greedy tokens."""
    assert_rows_independent(method, budget, [40, 97, 150], seed=3, steps=48)


@pytest.mark.parametrize("method", EVICTING)
def test_every_policy_ratio_and_absolute_budget(method):
    for budget in (0.4, 24):
        assert_rows_independent(method, budget, [23, 61, 90], seed=11, steps=16, **PARAMS.get(method, {}))


@pytest.mark.parametrize("method", ["lazyllm", "spatten"])
def test_lazyllm_and_spatten(method):
    params = {"prune_layers": (1, 3), "prune_ratios": (0.5, 0.5)} if method == "lazyllm" else {"head_ratio": 0.3}
    budget = 0.5 if method == "spatten" else None
    assert_rows_independent(method, budget, [23, 61, 90], seed=5, steps=16, **params)


@st.composite
def scenarios(draw):
    method = draw(st.sampled_from([*EVICTING, "lazyllm", "spatten"]))
    if method == "lazyllm":
        budget = None
    elif method == "spatten":
        budget = draw(st.sampled_from([0.5, 0.7]))
    else:
        budget = draw(st.one_of(st.sampled_from([0.3, 0.5, 0.8]), st.integers(8, 40)))
    lengths = draw(st.lists(st.integers(2, 80), min_size=2, max_size=3))
    return method, budget, lengths, draw(st.integers(0, 1000)), draw(st.integers(1, 10))


@settings(max_examples=12)
@given(scenarios())
def test_rows_independent_property(scenario):
    """Hypothesis: any method, budget, lengths and repeated-token prompts: every row equals the row alone."""
    method, budget, lengths, seed, steps = scenario
    assert_rows_independent(method, budget, lengths, seed, steps, **PARAMS.get(method, {}))


def test_spatten_quantized_rows_differ_only_by_a_rounding_step():
    """SpAtten with progressive quantization (8+4 bits) and head pruning: a row in a batch and alone give the same
    tokens; their stored keys and values differ at most by one quantization step per element, because float
    noise in a key (batched vs. single-row matmuls) can land it on the other side of a rounding boundary. That
    step is what separates their logits (up to ~3e-2 here); with float storage they agree to float noise."""
    from kvprune.caches.quant import QTensor, dequantize

    lengths = [40, 97, 150]
    prompts = [repeated_prompt(n, 21 + i) for i, n in enumerate(lengths)]
    params = {"quant_bits": (8, 4), "head_ratio": 0.5}
    batched, cache = _generate("spatten", None, prompts, 12, **params)
    width = max(lengths)
    steps = 0
    for i, p in enumerate(prompts):
        alone, cache1 = _generate("spatten", None, [p], 12, **params)
        assert torch.equal(batched[i], alone[0])
        for lb, la in zip(cache.layers, cache1.layers):
            # a batch stores a KV head until every row has pruned it: the row's heads are among the batch's
            heads = [int(torch.nonzero(lb.kv_heads == g).flatten()[0]) for g in la.kv_heads.tolist()]
            for stored_b, stored_a in ((lb.keys, la.keys), (lb.values, la.values)):
                assert isinstance(stored_b, QTensor)
                stored_b = stored_b.map(lambda t, heads=heads: t[:, heads])
                xb, xa = dequantize(stored_b, torch.float32, True), dequantize(stored_a, torch.float32, True)
                pos_b, pos_a = lb.positions[i] - (width - len(p)), la.positions[0]
                for slot_a, pos in enumerate(pos_a.tolist()):
                    if pos < 0 or not bool(la.valid[0, slot_a]):
                        continue
                    slot_b = int(torch.nonzero((pos_b == pos) & lb.valid[i]).flatten()[0])
                    step = torch.maximum(stored_b.scale[i, :, slot_b], stored_a.scale[0, :, slot_a])  # [H, 1]
                    gap = (xb[i, :, slot_b] - xa[0, :, slot_a]).abs()
                    assert bool((gap <= step * 1.01 + 1e-6).all())
                    steps += int((gap > step / 2).sum())
    assert steps < 0.01 * sum(len(p) for p in prompts) * 64  # rounding flips are rare


def test_tova_on_uniform_attention_keeps_the_oldest_and_the_newest():
    """Uniform attention rows (queries zeroed): every score ties, and ties evict the newest candidate first, so
    TOVA keeps the first budget - 1 tokens and the newest one (the documented tie rule), in a batch as alone."""
    from conftest import padded_batch, tiny_model

    model = tiny_model()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
    ids, mask = padded_batch([20, 13])
    cache = kvprune.make_cache(model, "tova", 8)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                       pad_token_id=0, **with_cache(cache))
    for r, n in enumerate((20, 13)):
        offset = 20 - n
        newest = 20 + 5 - 2  # the last generated token is never fed back
        for layer in cache.layers:
            for h in range(layer.keys.shape[1]):
                kept = sorted(kept_positions(layer, r, h))
                assert kept == [offset + k for k in range(7)] + [newest], (r, h, kept)
