"""Synthetic long-document QA generators, exact-match scoring, and the LongBench / RULER loaders."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest

from kvprune.errors import InvalidParameterError, KVPruneError
from kvprune.eval.loaders import (
    DatasetUnavailableError,
    load_longbench,
    load_ruler_jsonl,
    read_json_records,
)
from kvprune.eval.tasks import (
    ALL_WORDS,
    TASKS,
    build_suite,
    exact_match,
    format_prompt,
    generate_doc,
    generate_example,
    normalize_answer,
)

KEYS = {"id", "task", "context", "question", "answer", "length"}


@pytest.fixture(scope="module")
def suite():
    return build_suite(seed=11, n_per_task=6, lengths=(128, 512, 2048))


def test_deterministic_per_seed():
    a = build_suite(seed=3, n_per_task=3, lengths=(256, 512))
    b = build_suite(seed=3, n_per_task=3, lengths=(256, 512))
    c = build_suite(seed=4, n_per_task=3, lengths=(256, 512))
    assert a == b
    assert [e["context"] for e in a] != [e["context"] for e in c]
    assert generate_example("vartrack", 512, 9, index=2) == generate_example("vartrack", 512, 9, index=2)
    assert generate_example("vartrack", 512, 9, index=2) != generate_example("vartrack", 512, 9, index=3)


def test_suite_shape(suite):
    assert len(suite) == 3 * len(TASKS) * 6
    assert len({e["id"] for e in suite}) == len(suite)
    for e in suite:
        assert set(e) == KEYS
        assert e["task"] in TASKS
        assert all(isinstance(e[k], str) for k in ("id", "task", "context", "question", "answer"))
        words = e["answer"].split()
        if e["task"] == "vartrack":  # the chain, hop by hop: "<b> = <a> = <value>"
            assert len(words) in (3, 5) and words[1::2] == ["="] * (len(words) // 2)
        else:
            assert len(words) == 1
        assert set(format_prompt(e).split()) <= set(ALL_WORDS) | {"question", "answer"}


def test_lengths_hit_the_target_in_words(suite):
    # every word is one token of the demo tokenizer, plus BOS
    for e in suite:
        assert len(format_prompt(e).split()) + 1 == e["length"]


def test_lengths_in_demo_tokens(suite):
    from kvprune.demo import DEMO_MODEL_PATH, demo_model_available

    if not demo_model_available():
        pytest.skip(f"demo model folder absent ({DEMO_MODEL_PATH}); rebuild with scripts/train_demo.py")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL_PATH), local_files_only=True)
    for e in suite[:: max(1, len(suite) // 24)]:
        n = len(tok(format_prompt(e)).input_ids)
        assert abs(n - e["length"]) <= 0.01 * e["length"], (e["id"], n)


class _CharTokenizer:
    """A stand-in tokenizer: BOS plus one token per 3 characters of every word."""

    def __call__(self, text):
        return {"input_ids": [1] + [0 for w in text.split() for _ in range(0, len(w), 3)]}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [256, 1000])
def test_lengths_with_another_tokenizer(task, length):
    tok = _CharTokenizer()
    for i in range(3):
        e = generate_example(task, length, 2, index=i, tokenizer=tok)
        n = len(tok(format_prompt(e))["input_ids"])
        assert e["length"] == length and length - 2 <= n <= length, (e["id"], n)
    assert generate_example(task, length, 2, tokenizer=tok) == generate_example(task, length, 2, tokenizer=tok)


def test_prompt_layout():
    e = generate_example("multidoc", 256, 0)
    assert format_prompt(e) == f"{e['context']} {e['question']}"
    assert e["question"].startswith("question : in document ") and " ? answer : in document " in e["question"]
    assert e["question"].endswith(" is")


def _facts(text: str) -> list[tuple[str, str, str]]:
    return re.findall(r"the (\w+) of (\w+) is (\w+) \.", text)


def test_answers_are_in_context_and_correct(suite):
    for e in suite:
        ctx, q, a = e["context"], e["question"], e["answer"]
        assert set(a.split()) - {"="} <= set(ctx.split())
        if e["task"] in ("needle", "multikey"):
            rel, name = re.fullmatch(r"question : what is the (\w+) of (\w+) \? answer : the \1 of \2 is", q).groups()
            values = [v for r, n, v in _facts(ctx) if (r, n) == (rel, name)]
            assert values == [a]
            if e["task"] == "needle":
                assert len(_facts(ctx)) == 1
        elif e["task"] == "multidoc":
            doc, name = re.fullmatch(r"question : in document (\d+) , what is the code of (\w+) \? answer : in document \1 , the code of \2 is", q).groups()
            sections = dict(re.findall(r"document (\d+) : (.*?)(?= document \d+ :|$)", ctx))
            assert doc in sections
            assert [v for _, n, v in _facts(sections[doc]) if n == name] == [a]
            others = [v for d, s in sections.items() if d != doc for _, n, v in _facts(s) if n == name]
            assert others, "the asked name should also appear in a distractor document"
        else:
            var = re.fullmatch(r"question : what is the value of (\w+) \? answer : \1 =", q).group(1)
            env = dict(re.findall(r"var (\w+) = (\w+) \.", ctx))
            chain = []  # follow the assignments from the asked variable to its value
            while var in env:
                var = env[var]
                chain.append(var)
            assert a == " = ".join(chain) and 2 <= len(chain) <= 3, "at least one hop through another variable"
            assert chain[-1] not in env  # ends at a value


def test_vartrack_assignments_come_in_order():
    for i in range(20):
        e = generate_example("vartrack", 1024, 5, index=i)
        assigns = re.findall(r"var (\w+) = (\w+) \.", e["context"])
        variables = {lhs for lhs, _ in assigns}
        seen = set()
        for lhs, rhs in assigns:
            assert rhs in seen or rhs not in variables
            seen.add(lhs)


def test_filler_phrases_repeat():
    e = generate_example("needle", 1024, 0)
    sentences = [s.strip() for s in e["context"].split(" .") if s.strip()]
    counts = {s: sentences.count(s) for s in sentences}
    assert max(counts.values()) >= 2
    assert sum(c for c in counts.values() if c >= 2) > 0.5 * len(sentences)


def test_generate_doc_mask_and_questions():
    import random

    doc = generate_doc("multikey", random.Random(0), 500, n_questions=3)
    assert len(doc.words) == len(doc.mask) == 500
    assert len(doc.qas) == 3
    assert any(doc.mask) and not all(doc.mask)
    assert len({tuple(q) for q, _ in doc.qas}) == 3
    for q, a in doc.qas:
        assert q[:2] == ["question", ":"] and q[-1] == "is" and len(a) == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"task": "nope", "length": 512, "seed": 0}, {"task": "needle", "length": 10, "seed": 0}, {"task": "needle", "length": 512.0, "seed": 0}],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(InvalidParameterError):
        generate_example(**kwargs)
    with pytest.raises(ValueError):
        generate_example(**kwargs)


def test_build_suite_invalid():
    with pytest.raises(InvalidParameterError, match="n_per_task"):
        build_suite(0, 0)


@pytest.mark.parametrize(
    "pred, answer, hit",
    [
        ("kavo", "kavo", 1.0),
        ("  Kavo. ", "kavo", 1.0),
        ("kavo\n", " KAVO ", 1.0),
        ('"rimu seta"', "rimu   seta", 1.0),
        ("rimu  seta!", "rimu seta", 1.0),
        ("kavo lito", "kavo", 0.0),
        ("", "kavo", 0.0),
        ("kav", "kavo", 0.0),
        ("rimu,seta", "rimu seta", 0.0),
        ("paris", ["London", "Paris"], 1.0),
        ("rome", ["London", "Paris"], 0.0),
    ],
)
def test_exact_match(pred, answer, hit):
    assert exact_match(pred, answer) == hit


def test_normalize_answer():
    assert normalize_answer("  The  Answer , ") == "the answer"
    assert normalize_answer("a.b") == "a.b"


# ------------------------------------------------------------------------------------------------
# loaders (fixtures written to tmp_path; no network)
# ------------------------------------------------------------------------------------------------
LONGBENCH = [
    {"input": "Who wrote it?", "context": "Passage 1: ... written by Ann.", "answers": ["Ann", "Ann Lee"], "length": 7,
     "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": "lb-1"},
    {"input": "Where?", "context": "It happened in Oslo.", "answers": ["Oslo"], "length": 5,
     "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": "lb-2"},
]
RULER = [
    {"index": 0, "input": "Some text. The special magic number for ant is: 123. What is it?", "outputs": ["123"], "length": 40},
    {"index": 1, "input": "More text.", "outputs": ["456", "789"], "length": 33, "query": "q?"},
]


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture(params=["plain", "fake-datasets"])
def datasets_mode(request, monkeypatch):
    """Run each loader test without ``datasets`` and with a stand-in ``datasets`` module."""
    if request.param == "plain":
        monkeypatch.setitem(sys.modules, "datasets", None)  # import fails -> plain JSON fallback
        return None
    calls = []

    def load_dataset(kind, *args, data_files=None, split=None, **kw):
        calls.append((kind, data_files, split))
        assert kind == "json" and split == "train"
        with open(data_files) as f:
            return [json.loads(line) for line in f if line.strip()]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_load_longbench_file(tmp_path, datasets_mode):
    f = _write_jsonl(tmp_path / "hotpotqa.jsonl", LONGBENCH)
    exs = load_longbench(f)
    assert [set(e) >= KEYS for e in exs] == [True, True]
    e = exs[0]
    assert (e["id"], e["task"], e["question"], e["answer"], e["answers"], e["length"]) == (
        "lb-1", "hotpotqa", "Who wrote it?", "Ann", ["Ann", "Ann Lee"], 7)
    assert e["context"] == LONGBENCH[0]["context"]
    assert exact_match("ann lee.", e["answers"]) == 1.0
    if datasets_mode is not None:
        assert datasets_mode == [("json", str(f), "train")]


def test_load_longbench_folder_layout(tmp_path, datasets_mode):
    _write_jsonl(tmp_path / "hotpotqa.jsonl", LONGBENCH)
    _write_jsonl(tmp_path / "narrativeqa.jsonl", LONGBENCH[:1])
    assert len(load_longbench(tmp_path, "hotpotqa")) == 2
    assert len(load_longbench(tmp_path, "narrativeqa")) == 1
    with pytest.raises(DatasetUnavailableError, match="subset"):
        load_longbench(tmp_path)
    with pytest.raises(DatasetUnavailableError):
        load_longbench(tmp_path, "missing")


def test_load_ruler_jsonl(tmp_path, datasets_mode):
    f = _write_jsonl(tmp_path / "niah_single_1.jsonl", RULER)
    exs = load_ruler_jsonl(f)
    assert [e["task"] for e in exs] == ["niah_single_1"] * 2
    assert exs[0]["id"] == "0" and exs[0]["context"] == RULER[0]["input"] and exs[0]["question"] == ""
    assert exs[0]["answer"] == "123" and exs[0]["length"] == 40
    assert exs[1]["answers"] == ["456", "789"] and exs[1]["question"] == "q?"
    assert exact_match("789", exs[1]["answers"]) == 1.0


def test_round_trip_own_format(tmp_path, datasets_mode):
    suite = build_suite(seed=1, n_per_task=1, lengths=(128,))
    f = _write_jsonl(tmp_path / "mine.jsonl", suite)
    back = load_ruler_jsonl(f)
    assert [{k: e[k] for k in KEYS} for e in back] == suite
    assert [{k: e[k] for k in KEYS} for e in load_longbench(f)] == suite


def test_plain_reader_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_json_records(bad)
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps(LONGBENCH))
    assert len(read_json_records(lst)) == 2
    with pytest.raises(ValueError, match="no answers"):
        load_ruler_jsonl(_write_jsonl(tmp_path / "noans.jsonl", [{"index": 0, "input": "x"}]))


def test_missing_file_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(DatasetUnavailableError, match="no such file"):
        load_ruler_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetUnavailableError, match="no such file"):
        load_longbench(tmp_path / "nope.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError, match="local file") as info:
        load_longbench("THUDM/LongBench", "hotpotqa")
    assert isinstance(info.value, KVPruneError) and "offline" in str(info.value)


def test_hub_name_without_datasets(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DatasetUnavailableError, match="pip install datasets"):
        load_longbench("THUDM/LongBench", "hotpotqa")


def test_hub_connection_error_is_explained(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def load_dataset(*a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DatasetUnavailableError, match="local file"):
        load_longbench("THUDM/LongBench", "hotpotqa")
