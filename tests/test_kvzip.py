"""KVzip (arXiv 2505.23416): faithfulness to a slow reference, exactness, batches, errors, eval reachability."""

from __future__ import annotations

import pytest
import torch
from conftest import generate_logits, padded_batch, tiny_model
from reference_kvzip import keep_sets, kvzip_scores
from transformers import DynamicCache

import kvprune
from kvprune.errors import CacheUsageError, InvalidBudgetError, InvalidParameterError
from kvprune.integrations.compat import with_cache
from kvprune.integrations.kvzip import replay_prompts
from kvprune.policies.kvzip import KVzip


class CharTokenizer:
    """A stand-in tokenizer: one id per character (3 + code % 100) and a two-tag chat template."""

    chat_template = "user/assistant"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [3 + ord(ch) % 100 for ch in text]

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = True) -> str:
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + ("<ai>" if add_generation_prompt else "")


def _ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _kept(cache) -> list[list[set[int]]]:
    """Kept positions per layer and KV head of row 0."""
    return [[set(layer.positions[0, h][layer.valid[0, h]].tolist()) for h in range(layer.positions.shape[1])]
            for layer in cache.layers]


def _compress(model, ids: list[int], budget, **params):
    cache = kvprune.make_cache(model, "kvzip", budget, **params)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), **with_cache(cache))
    return cache


@pytest.mark.parametrize("scope", ["head", "global"])
@pytest.mark.parametrize("tokenizer", [None, CharTokenizer()])
def test_keep_sets_and_scores_equal_the_reference(scope, tokenizer):
    ids, chunk, carry, n_sink, cap = _ids(40), 16, 4, 2, 12
    model, eager = tiny_model("llama"), tiny_model("llama", attn="eager")
    policy = KVzip(n_sink=n_sink, chunk_size=chunk, carry_over=carry, scope=scope)
    prompts = replay_prompts(tokenizer, policy)
    assert (prompts is None) == (tokenizer is None)
    ref = kvzip_scores(eager, ids, chunk, carry, n_sink, prompts)
    cache = _compress(model, ids, cap, n_sink=n_sink, chunk_size=chunk, carry_over=carry, scope=scope,
                      tokenizer=tokenizer, prefill_only=scope == "global")
    assert cache.get_seq_length() == len(ids)  # the replay's tokens are gone, positions continue after the context
    assert _kept(cache) == keep_sets(ref, cap, n_sink, scope)
    for layer, r in zip(cache.layers, ref):  # the kept pairs carry the reference's scores
        for h in range(r.shape[0]):
            pos = layer.positions[0, h][layer.valid[0, h]].long()
            ok = pos >= n_sink  # sinks are scored by every chunk here, by the first one in the reference
            torch.testing.assert_close(layer.scores[0, h][layer.valid[0, h]][ok].double(), r[h, pos[ok]],
                                       rtol=1e-4, atol=1e-6)
    if scope == "global":  # one budget across heads and layers: the heads keep different counts, cap on average
        kept = torch.stack([s for s in cache.stats().kept])
        assert int(kept.sum()) == cap * kept.numel() and len(set(kept.flatten().tolist())) > 1


def test_keep_sets_on_the_pretrained_model():
    from kvprune.models.llama2c import default_stories260k_path, load_llama2c

    path = default_stories260k_path()
    if not path.exists():
        pytest.skip(f"pretrained fixture {path} absent")
    model = load_llama2c(path, attn_implementation="sdpa")
    eager = load_llama2c(path, attn_implementation="eager")
    ids = [1] + _ids(47, seed=3)
    ref = kvzip_scores(eager, ids, 20, 8, 4)
    for scope in ("global", "head"):
        cache = _compress(model, ids, 16, chunk_size=20, scope=scope)
        assert _kept(cache) == keep_sets(ref, 16, 4, scope)


def test_budget_at_least_the_sequence_reproduces_dynamic_cache():
    model = tiny_model("llama")
    ids, mask = padded_batch([18, 11], seed=2)
    seq_ref, logits_ref = generate_logits(model, ids, mask, DynamicCache(), n=5)
    for params in ({}, {"scope": "head"}, {"prefill_only": True}, {"chunk_size": 5}):
        cache = kvprune.make_cache(model, "kvzip", 64, **params)
        seq, logits = generate_logits(model, ids, mask, cache, n=5)
        assert torch.equal(seq, seq_ref)
        torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
        assert cache.stats().evictions == [0, 0]


@pytest.mark.parametrize("params", [{"scope": "head"}, {"scope": "global"}, {"prefill_only": True}])
def test_left_padded_rows_equal_rows_run_alone(params):
    model = tiny_model("llama")
    lengths = [23, 14]
    ids, mask = padded_batch(lengths, seed=4)
    kw = dict(n_sink=2, chunk_size=9, tokenizer=CharTokenizer(), **params)
    seq, logits = generate_logits(model, ids, mask, kvprune.make_cache(model, "kvzip", 0.5, **kw), n=4)
    for row, n in enumerate(lengths):
        alone = kvprune.make_cache(model, "kvzip", 0.5, **kw)
        seq1, logits1 = generate_logits(model, ids[row : row + 1, -n:], mask[row : row + 1, -n:], alone, n=4)
        assert torch.equal(seq[row, -4:], seq1[0, -4:])
        torch.testing.assert_close(logits[row], logits1[0], rtol=1e-4, atol=1e-4)


def test_budget_is_held_and_stats_count_evictions():
    model = tiny_model("llama")
    ids, mask = padded_batch([30], seed=5)
    cache = kvprune.make_cache(model, "kvzip", 10, scope="head")
    seq, _ = generate_logits(model, ids, mask, cache, n=6, eos_token_id=None)
    stats = cache.stats()
    seen = seq.shape[1] - 1  # the last generated token is never fed back
    assert stats.tokens_seen == seen == 35
    assert all(int(k.max()) <= 10 for k in stats.kept)  # later tokens displace the lowest-scored context pairs
    assert all(e == 2 * (seen - 10) for e in stats.evictions)
    grow = kvprune.make_cache(model, "kvzip", 10, scope="head", prefill_only=True)
    generate_logits(model, ids, mask, grow, n=6, eos_token_id=None)
    assert all(int(k.min()) == 10 + 5 for k in grow.stats().kept)  # kvpress's schedule: the answer is appended
    assert grow.replay_seconds > 0
    ranked = kvprune.make_cache(model, "kvzip", 10)  # the default scope="global": one budget per row over heads and layers
    generate_logits(model, ids, mask, ranked, n=6, eos_token_id=None)
    kept = torch.stack(ranked.stats().kept)
    assert int(kept.sum()) == 10 * kept.numel() and len(set(kept.flatten().tolist())) > 1
    assert all(int(layer.positions[0, h][layer.valid[0, h]].max()) == 34 for layer in ranked.layers for h in range(2))


def test_reachable_through_eval_compare():
    from kvprune.eval import compare

    model = tiny_model("llama")
    df = compare(model, None, task="fidelity", policies=["kvzip"], budgets=[0.5], n_sequences=2, sequence_length=24)
    assert set(df["policy"]) >= {"kvzip", "full"} and df["value"].notna().all()


def test_bad_parameters_are_refused():
    model = tiny_model("llama")
    for params, err in [
        ({"chunk_size": 0}, InvalidParameterError),
        ({"scope": "layer"}, InvalidParameterError),
        ({"carry_over": -1}, InvalidParameterError),
        ({"recent": 4}, InvalidParameterError),
        ({"prompt": 3}, InvalidParameterError),
        ({"window": 8}, InvalidParameterError),
        ({"tokenizer": object()}, InvalidParameterError),
        ({"kv_bits": 8}, InvalidParameterError),
    ]:
        with pytest.raises(err):
            kvprune.make_cache(model, "kvzip", 0.5, **params)
    with pytest.raises(InvalidBudgetError):
        kvprune.make_cache(model, "kvzip", None)
    with pytest.raises(InvalidBudgetError):
        kvprune.make_cache(model, "kvzip", 3)  # below the 4 sinks + the newest token
    cache = kvprune.make_cache(model, "kvzip", 0.5)
    with pytest.raises(InvalidParameterError, match="input_ids"):
        model(inputs_embeds=model.model.embed_tokens(torch.tensor([_ids(8)])), **with_cache(cache))
    plain = kvprune.PruningCache("kvzip", 0.5, config=model.config)  # cannot replay: refused, never silently wrong
    with pytest.raises(CacheUsageError, match="make_cache"):
        model(input_ids=torch.tensor([_ids(8)]), **with_cache(plain))
