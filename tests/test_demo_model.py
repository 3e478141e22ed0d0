"""The project's demo model (kvprune/demo/model): loads offline like a hub model and answers long-document questions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kvprune.demo import DEMO_MODEL_PATH, demo_model_available, load_demo_model
from kvprune.eval.tasks import (
    NAMES,
    TASKS,
    VALUES,
    build_suite,
    exact_match,
    format_prompt,
)

pytestmark = pytest.mark.skipif(
    not demo_model_available(),
    reason=f"demo model folder absent or incomplete ({DEMO_MODEL_PATH}); rebuild it with `python scripts/train_demo.py`",
)

HELDOUT_SEED = 424242  # never used in training (training documents come from generate_doc with other seeds)


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    return load_demo_model()


def test_folder_is_a_small_safetensors_model_with_a_card():
    files = {p.name for p in DEMO_MODEL_PATH.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".py")) for f in files)
    assert (DEMO_MODEL_PATH / "model.safetensors").stat().st_size <= 20 * 2**20
    config = json.loads((DEMO_MODEL_PATH / "config.json").read_text())
    assert config["model_type"] == "llama" and config["max_position_embeddings"] >= 2048
    assert "auto_map" not in config
    card = (DEMO_MODEL_PATH / "README.md").read_text()
    for needle in ("seed", "steps", "Wall time", "| 512 |", "| 2048 |", "scripts/train_demo.py"):
        assert needle in card


def test_loads_offline_without_sentencepiece():
    code = (
        "import sys; sys.modules['sentencepiece'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"p = {str(DEMO_MODEL_PATH)!r}\n"
        "tok = AutoTokenizer.from_pretrained(p, local_files_only=True)\n"
        "m = AutoModelForCausalLM.from_pretrained(p, local_files_only=True)\n"
        f"ids = tok('the code of {NAMES[0]} is').input_ids\n"
        "assert ids[0] == tok.bos_token_id and len(ids) == 6, ids\n"
        "print(type(m).__name__, tok.eos_token_id, tok.pad_token_id)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "", "HOME": "/tmp"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["LlamaForCausalLM", "2", "3"]


def test_load_demo_model(demo):
    model, tok = demo
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config._attn_implementation == "sdpa"
    text = f"the code of {NAMES[0]} is {VALUES[0]} ."
    ids = tok(text).input_ids
    assert len(ids) == 1 + len(text.split())  # one token per word, plus BOS
    assert tok.decode(ids, skip_special_tokens=True) == text


def _greedy_exact_match(model, tok, examples) -> float:
    prompts = [format_prompt(e) for e in examples]
    enc = tok(prompts, return_tensors="pt")  # equal lengths by construction: no padding
    assert enc.input_ids.shape[1] == examples[0]["length"]
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    preds = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return sum(exact_match(p, e["answer"]) for p, e in zip(preds, examples)) / len(examples)


def _stated() -> dict:
    """Exact match per length and task that the model card states (measured by scripts/train_demo.py)."""
    return json.loads((DEMO_MODEL_PATH / "eval_results.json").read_text())


@pytest.mark.parametrize("length, n_per_task", [(512, 8), (2048, 4)])
def test_reaches_its_stated_accuracy(demo, length, n_per_task):
    """Greedy full-cache exact match on other held-out documents agrees with the card, both ways.

    The card's figure comes from 50 (512) / 25 (2048) documents per task; this sample is smaller, so the
    allowed gap is three binomial standard deviations of the sample plus one example.
    """
    model, tok = demo
    stated = _stated()[str(length)]
    examples = build_suite(seed=HELDOUT_SEED, n_per_task=n_per_task, lengths=(length,))
    assert {e["task"] for e in examples} == set(TASKS)
    n = len(examples)
    em = _greedy_exact_match(model, tok, examples)
    p = stated["all"]
    tolerance = 3 * (p * (1 - p) / n) ** 0.5 + 1 / n
    assert abs(em - p) <= tolerance, (em, stated, tolerance)
    card = (DEMO_MODEL_PATH / "README.md").read_text()
    assert f"| {length} | " in card and f"{p:.3f}" in card


def test_card_meets_the_project_targets():
    """Full-cache exact match >= 0.98 at 512 tokens and >= 0.95 at 2048 on every task, as the card states
    (the card's figures are checked against fresh held-out documents above)."""
    stated = _stated()
    for length, target in (("512", 0.98), ("2048", 0.95)):
        assert set(TASKS) <= set(stated[length])
        for task in (*TASKS, "all"):
            assert stated[length][task] >= target, (length, task, stated[length][task])
    assert "**Status: meets the targets.**" in (DEMO_MODEL_PATH / "README.md").read_text()


def test_retrieves_by_name_far_above_chance(demo):
    """At 512 tokens every task is answered, not guessed (chance is about 1 in 5 facts)."""
    model, tok = demo
    for task in TASKS:
        examples = build_suite(seed=HELDOUT_SEED + 1, n_per_task=8, lengths=(512,), tasks=(task,))
        assert _greedy_exact_match(model, tok, examples) >= 7 / 8, task


def test_batched_qa_equals_one_at_a_time(demo):
    """Rows of a batch that stop early keep being fed while others decode; their answers must not change."""
    from kvprune.eval.qa import run_qa

    model, tok = demo
    examples = build_suite(seed=HELDOUT_SEED + 2, n_per_task=2, lengths=(512,))
    for policy, budget in (("lazyllm", None), ("h2o", 0.5)):
        alone = [a.prediction for a in run_qa(model, tok, examples, policy, budget, batch_size=1)]
        batched = [a.prediction for a in run_qa(model, tok, examples, policy, budget, batch_size=4)]
        assert batched == alone, policy
