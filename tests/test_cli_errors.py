"""Every bad command-line input: one line on stderr, exit status 2, and no work done before the check."""

from __future__ import annotations

import json

import pytest

from kvprune.eval import cli


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any command gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_model", refuse)


def _one_line_error(capsys, argv: list[str], phrase: str) -> None:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("kvprune: error:") and phrase in lines[0], lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["compare", "--budgets", "abc"], "'abc' is not a budget"),
        (["compare", "--budgets", "0.25,0"], "'0' is not a budget"),
        (["compare", "--budgets", "1.5"], "'1.5' is not a budget"),
        (["compare", "--budgets", str(2**63)], "is not a budget"),
        (["compare", "--budgets", ","], "names nothing"),
        (["compare", "--policies", "h2o,lru"], "unknown method 'lru'"),
        (["compare", "--n-examples", "0"], "'0' is not an integer >= 1"),
        (["compare", "--lengths", "512,x"], "'x' is not an integer >= 1"),
        (["compare", "--protocol", "sideways"], "invalid choice: 'sideways'"),
        (["compare", "--model", "/no/such/model"], "--model '/no/such/model' is not a model"),
        (["longqa", "--model", "./missing-folder"], "is not a model"),
        (["longqa", "--policy", "LRU"], "unknown method 'LRU'"),
        (["longqa", "--policy", "full", "--budget", "64"], "--policy full takes no budget"),
        (["longqa", "--policy", "h2o", "--params", "alpha"], "--params takes key=value pairs"),
        (["longqa", "--policy", "h2o", "--params", "windw=3"], "has no parameter(s) ['windw']"),
        (["longqa", "--policy", "lazyllm", "--params", "prune_layers=[1,1],prune_ratios=[0.5,0.5]"],
         "pruning layer"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "-1"], "'-1' is not an integer >= 1"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments(capsys, no_model, argv, phrase):
    _one_line_error(capsys, argv, phrase)


def test_lazyllm_duplicate_layers_in_params(capsys, no_model):
    """A LazyLLM schedule colliding on one layer is known only with the model's depth; the object itself refuses
    duplicates given as indices at once."""
    _one_line_error(capsys, ["longqa", "--policy", "lazyllm", "--params", "prune_layers=[1,1],prune_ratios=[0.5,0.5]"],
                    "pruning layers 1 and 1")


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        ("", "holds no examples"),
        ("\n\n", "holds no examples"),
        ("{not json\n", "not a JSON line"),
        ('{"context": "a", "question": "b"}\n', "has no answers"),
        ("[1, 2]\n", "expected a JSON object per line"),
    ],
)
def test_bad_files(tmp_path, capsys, no_model, content, phrase):
    path = tmp_path / "examples.jsonl"
    path.write_text(content)
    _one_line_error(capsys, ["compare", "--file", str(path)], phrase)
    _one_line_error(capsys, ["longqa", "--file", str(path)], phrase)


def test_missing_file(tmp_path, capsys, no_model):
    _one_line_error(capsys, ["compare", "--file", str(tmp_path / "absent.jsonl")], "no such file")


def test_a_good_file_still_runs(tmp_path, capsys):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"context": "the code of kiba is 7 .", "question": "what is the code of kiba ?",
                                "answer": "7"}) + "\n")
    assert cli.main(["longqa", "--file", str(path), "--policy", "streaming", "--budget", "8"]) == 0
    assert "over 1 examples" in capsys.readouterr().out


def test_help_exits_zero(capsys):
    assert cli.main(["compare", "--help"]) == 0
    assert "--protocol" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["compare", "--lengths", "32"], "--lengths 32 is too short for the synthetic suite"),
        (["compare", "--model", "smollm2", "--lengths", "200"], "too short for the real-text suite"),
        (["generate", "--prompt", "   "], "--prompt is empty"),
    ],
)
def test_more_bad_arguments(capsys, no_model, argv, phrase):
    _one_line_error(capsys, argv, phrase)


def test_out_is_a_file(tmp_path, capsys, no_model):
    target = tmp_path / "taken"
    target.write_text("x")
    _one_line_error(capsys, ["compare", "--out", str(target)], "is a file; give a folder")


def test_flash_attention_without_cuda(capsys, no_model):
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn and CUDA are present here")
    _one_line_error(capsys, ["compare", "--attn", "flash_attention_2"], "backend 'flash_attention_2' needs")


def test_lengths_beyond_the_model(capsys):
    """Known only once the model is loaded (its positions), and still refused before any example is built."""
    assert cli.main(["longqa", "--lengths", "100000", "--policy", "full"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kvprune: error:")]
    assert errors == ["kvprune: error: --lengths 100000 leaves no room to answer within this model's 2560 positions; "
                      "give lengths <= 2496"]
    assert "Traceback" not in err


def test_run_qa_refuses_examples_without_answers():
    from conftest import tiny_model

    from kvprune.errors import InvalidParameterError
    from kvprune.eval.qa import run_qa

    with pytest.raises(InvalidParameterError, match="example 1 has no 'answer'"):
        run_qa(tiny_model(), object(), [{"context": "a", "question": "b", "answer": "c"}, {"context": "a"}])
