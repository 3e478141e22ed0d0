"""compare() returns the documented columns; the plot is a matplotlib Figure; the CLI runs end to end."""

from __future__ import annotations

import json

import matplotlib
import pandas as pd
import pytest
from conftest import tiny_model

matplotlib.use("Agg")

from kvprune.eval.cli import main  # noqa: E402
from kvprune.eval.compare import COLUMNS, compare, plot_quality_vs_budget  # noqa: E402
from kvprune.models.llama2c import default_stories260k_path  # noqa: E402

pytestmark = pytest.mark.integration
needs_stories = pytest.mark.skipif(
    not default_stories260k_path().is_file(), reason=f"stories260K fixture absent at {default_stories260k_path()}"
)


class CharTokenizer:
    """A byte-level stand-in tokenizer, enough to drive run_qa on a tiny random model."""

    eos_token_id = 2
    pad_token_id = 0

    def encode(self, text, add_special_tokens=True):
        return [1] * add_special_tokens + [3 + (ord(c) % 120) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + (int(i) % 26)) for i in ids if int(i) > 2)


def test_compare_qa_columns_and_plot():
    model = tiny_model("llama", "sdpa")
    examples = [
        {"id": str(i), "task": "toy", "context": "abc " * (10 + i), "question": "q?", "answer": "zz"} for i in range(4)
    ]
    df = compare(model, CharTokenizer(), task=examples, policies=["a2sf", "random"], budgets=[0.5, 16], batch_size=2)
    assert list(df.columns) == COLUMNS
    assert len(df) == 1 + 2 * 2  # the full cache once, then each policy at each budget
    assert set(df["metric"]) == {"exact_match"}
    assert df["value"].between(0, 1).all() and (df["n"] == 4).all()
    assert (df["prefill_s"] > 0).all() and (df["kv_bytes"] > 0).all()
    full_kv = float(df.loc[df.policy == "full", "kv_bytes"].iloc[0])
    assert (df.loc[df.budget == 0.5, "kv_bytes"] < full_kv).all()  # a budget really holds less
    fig = plot_quality_vs_budget(df)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {"a2sf", "random", "full cache"}


def test_compare_runs_the_three_papers_methods():
    """SpAtten takes a KV-memory fraction (out-of-reach ones are skipped with a warning); LazyLLM runs once."""
    model = tiny_model("llama", "sdpa", num_hidden_layers=4)
    examples = [
        {"id": str(i), "task": "toy", "context": "abc " * (10 + i), "question": "q?", "answer": "zz"} for i in range(2)
    ]
    with pytest.warns(UserWarning, match="spatten skipped at budget 0.1"):
        df = compare(model, CharTokenizer(), task=examples, policies=["spatten", "lazyllm", "a2sf"],
                     budgets=[0.1, 0.6], batch_size=2)
    assert list(df.columns) == COLUMNS
    runs = sorted(zip(df.policy, df.budget.fillna(-1)))
    assert runs == [("a2sf", 0.1), ("a2sf", 0.6), ("full", -1), ("lazyllm", -1), ("spatten", 0.6)]
    full_kv = float(df.loc[df.policy == "full", "kv_bytes"].iloc[0])
    spatten_kv = float(df.loc[df.policy == "spatten", "kv_bytes"].iloc[0])
    assert spatten_kv < 0.75 * full_kv


@needs_stories
def test_compare_fidelity_task():
    from kvprune.models.llama2c import load_llama2c

    model = load_llama2c(default_stories260k_path(), attn_implementation="sdpa")
    df = compare(model, task="fidelity", policies=["h2o"], budgets=[0.5], n_sequences=2, sequence_length=48)
    assert list(df.columns) == COLUMNS
    assert set(df["metric"]) == {"nll_increase", "greedy_agreement", "kl"}
    full = df[df.policy == "full"].set_index("metric")["value"]
    assert full["nll_increase"] == pytest.approx(0, abs=1e-5) and full["greedy_agreement"] == 1.0


@needs_stories
def test_cli_compare_writes_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compare", "--model", "stories260k", "--policies", "h2o,random", "--budgets", "0.5",
                 "--sequences", "2", "--sequence-length", "48", "--out", str(out), "--quiet"])
    assert code == 0
    df = pd.read_csv(out / "compare.csv")
    assert list(df.columns) == COLUMNS and set(df["policy"]) == {"full", "h2o", "random"}
    assert len(json.loads((out / "compare.json").read_text())) == len(df)
    assert (out / "compare.png").stat().st_size > 1000
    assert "nll_increase by policy and KV budget" in capsys.readouterr().out


def test_run_qa_reads_the_question_against_the_compressed_context():
    """The context is one forward (compressed after it), the question a second; with the full cache that equals one pass."""
    import torch
    from transformers import DynamicCache

    from kvprune.eval.qa import run_qa

    model = tiny_model("llama", "sdpa")
    tok = CharTokenizer()
    examples = [{"id": str(i), "task": "toy", "context": "abcd " * (8 + 3 * i), "question": "q?" * (1 + i), "answer": "zz"}
                for i in range(3)]
    seen = []
    original = model.forward

    def recording(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[1])
        return original(*args, **kwargs)

    model.forward = recording
    answers = run_qa(model, tok, examples, "full", max_new_tokens=3, batch_size=3)
    model.forward = original
    widths = (len(tok.encode(examples[-1]["context"])), len(tok.encode(" " + examples[-1]["question"], add_special_tokens=False)))
    assert seen[:2] == list(widths), "context and question are separate forwards"
    for ex, a in zip(examples, answers):  # full cache: the same answer as one plain generate over the whole prompt
        ids = torch.tensor([tok.encode(ex["context"] + " " + ex["question"])])
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0, past_key_values=DynamicCache())
        assert a.prediction == tok.decode(out[0, ids.shape[1]:]).split("\n")[0].strip()


def test_cli_params_take_lists_and_reject_malformed_pairs():
    from kvprune.eval.cli import CLIError, _params

    assert _params("alpha=0.1,n_sink=4,importance=norm") == {"alpha": 0.1, "n_sink": 4, "importance": "norm"}
    assert _params("prune_layers=[1,3],prune_ratios=[0.6,0.8],decode_ratios=[0,0.8]") == {
        "prune_layers": (1, 3), "prune_ratios": (0.6, 0.8), "decode_ratios": (0, 0.8)}
    assert _params(None) == {}
    for bad in ("alpha", "prune_ratios=[0.6,"):
        with pytest.raises(CLIError, match="--params"):
            _params(bad)


def test_cli_longqa_budget_defaults_and_typed_errors(capsys):
    """LazyLLM runs without a budget by default; a bad budget or a budget LazyLLM cannot take exits 2 with one line."""
    assert main(["longqa", "--policy", "lazyllm", "--n-examples", "1", "--lengths", "256",
                 "--params", "prune_layers=[1,3],prune_ratios=[0.6,0.8],decode_ratios=[0,0.8]"]) == 0
    assert "(lazyllm, budget None, query_agnostic)" in capsys.readouterr().out
    assert main(["longqa", "--policy", "h2o", "--budget", "0", "--n-examples", "1", "--lengths", "256"]) == 2
    assert "'0' is not a budget" in capsys.readouterr().err
    assert main(["longqa", "--policy", "lazyllm", "--budget", "0.5", "--n-examples", "1", "--lengths", "256"]) == 2
    assert "takes no budget" in capsys.readouterr().err
