"""Tensor parallelism: every method under ``torchrun --nproc-per-node 2`` (gloo, CPU) equals one process.

A tiny 4-layer Llama (4 query / 2 KV heads) is saved to a temporary folder and loaded twice: here, as one
process, and by two ranks with ``tp_plan="auto"`` (``tests/tp_worker.py``), so that each rank holds one KV
head. For every method, on batch 1 and on a left-padded batch of 3, 12 greedy tokens: every rank's tokens
equal the single-process tokens, and the ranks' keep-sets together (keyed by global KV head) equal the
single-process keep-sets. LazyLLM's at-most-once and SpAtten's cascade invariants are checked on every rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import kvprune
import tp_worker

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
#: the two ranks take ~15 s on an idle 2-core box (interpreter start, gloo rendezvous, 24 generates each)
TIMEOUT_S = 240


def _gloo_missing() -> str | None:
    if not torch.distributed.is_available():
        return "this torch build has no torch.distributed"
    if not torch.distributed.is_gloo_available():
        return "this torch build has no gloo backend"
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(single-process record, [rank 0 record, rank 1 record])`` from tests/tp_worker.py."""
    reason = _gloo_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("tp")
    model_dir, out_dir = root / "model", root / "out"
    out_dir.mkdir()
    tiny_model("llama", num_hidden_layers=4).save_pretrained(model_dir)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference = tp_worker.run(model)
    reference["_unaware"] = tp_worker.unaware(model)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "tp_worker.py"), str(model_dir), str(out_dir), "--tp"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s (a rank waiting in a collective?): {e.stderr!s:.3000}")
    if proc.returncode != 0:  # the first rank's error is the cause; a peer then aborts inside a collective
        text = proc.stdout + proc.stderr
        errors = [line for line in text.splitlines() if "Error" in line or "error:" in line][:20]
        pytest.fail(f"torchrun failed ({proc.returncode}); errors:\n" + "\n".join(errors) + f"\n...\n{text[-3000:]}")
    ranks = [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]
    return reference, ranks


def _cases():
    return [f"{m}/{b}" for b in ("b1", "b3") for m in tp_worker.METHODS]


@pytest.mark.parametrize("case", _cases())
def test_every_rank_generates_the_single_process_tokens(runs, case):
    reference, ranks = runs
    assert reference[case]["broken"] == [], reference[case]["broken"]
    for rank, record in enumerate(ranks):
        assert record[case]["tokens"] == reference[case]["tokens"], f"rank {rank}"


@pytest.mark.parametrize("case", _cases())
def test_ranks_keep_their_own_heads_and_together_the_single_process_keep_sets(runs, case):
    reference, ranks = runs
    merged = {}
    for rank, record in enumerate(ranks):
        keep = record[case]["keep"]
        if not case.startswith("lazyllm"):  # LazyLLM's sets are per row (every head holds the same tokens)
            heads = {int(key.split("/")[2]) for key in keep}
            assert heads <= {rank}, f"rank {rank} holds KV heads {sorted(heads)}; it should hold only head {rank}"
        merged.update(keep)
    assert merged == reference[case]["keep"]


@pytest.mark.parametrize("case", [c for c in _cases() if c.split("/")[0] in ("lazyllm", "spatten")])
def test_lazyllm_and_spatten_invariants_and_state_hold_on_every_rank(runs, case):
    reference, ranks = runs
    state = ("computed",) if case.startswith("lazyllm") else ("depth", "head_depth")
    for rank, record in enumerate(ranks):
        assert record[case]["broken"] == [], f"rank {rank}: {record[case]['broken']}"
        for name in state:
            assert record[case][name] == reference[case][name], f"rank {rank}: {name}"


@pytest.mark.parametrize("case", ["tova/b3", "spatten/b3"])
def test_stats_report_the_rank_and_on_request_the_total(runs, case):
    reference, ranks = runs
    want = reference[case]["stats"]
    for rank, record in enumerate(ranks):
        got = record[case]["stats"]
        assert got["kept"] == [[row[rank : rank + 1] for row in layer] for layer in want["kept"]], f"rank {rank}"
        assert got["kv_bytes"] * 2 == want["kv_bytes"]
        assert got["total_kept"] == want["kept"] and got["total_kv_bytes"] == want["kv_bytes"]
        assert got["total_evictions"] == want["total_evictions"]


def _combines_heads(label: str) -> bool:
    """Whether the method's decision combines heads: TOVA, LazyLLM, SpAtten, and KVzip's global allocation."""
    method, _, params = tp_worker.METHODS[label]
    if method == "kvzip":
        from kvprune.policies.kvzip import KVzip

        return KVzip(**{k: v for k, v in params.items() if k != "prefill_only"}).scope == "global"
    return method in ("tova", "lazyllm", "spatten")


def test_reductions_run_only_for_decisions_that_combine_heads(runs):
    _, ranks = runs
    for record in ranks:
        calls = {case: record[case]["reduce_calls"] for case in _cases()}
        combined = {c for c in calls if _combines_heads(c.split("/")[0])}
        assert all(calls[c] > 0 for c in combined), {c: calls[c] for c in combined if not calls[c]}
        assert all(calls[c] == 0 for c in calls if c not in combined), {c: n for c, n in calls.items() if n and c not in combined}


def test_a_cache_that_does_not_know_the_group_is_refused_on_every_rank(runs):
    reference, ranks = runs
    assert reference["_unaware"] == "none"  # one process: the same cache is fine
    assert [r["_unaware"] for r in ranks] == ["CacheUsageError", "CacheUsageError"]


def test_every_registered_method_is_run_under_tensor_parallelism():
    from kvprune.policies import methods

    covered = {method for method, _, _ in tp_worker.METHODS.values()}
    assert covered == set(methods()), f"add {sorted(set(methods()) - covered)} to tests/tp_worker.py METHODS"


# -- the helpers alone (one process: no group) ----------------------------------------------------------------

class _Mesh:
    """A stand-in for a 1-D ``tp`` device mesh of ``n`` ranks (no process group is created)."""

    mesh_dim_names = ("tp",)
    ndim = 1

    def __init__(self, n: int) -> None:
        self.n = n

    def size(self) -> int:
        return self.n

    def __getitem__(self, name):
        return self

    def get_group(self):
        return "group"

    def get_local_rank(self) -> int:
        return 1


def test_an_unsharded_model_gets_no_group_and_the_helpers_are_no_ops():
    from kvprune.distributed import SINGLE, tensor_parallel_of, total_stats

    model = tiny_model("llama")
    assert tensor_parallel_of(model) is SINGLE
    scores = torch.rand(2, 4, 7)
    assert torch.equal(SINGLE.head_mean(scores), scores.mean(1, keepdim=True))
    assert SINGLE.all_reduce_sum(scores) is scores and SINGLE.local_range(4) == (0, 4)
    cache = kvprune.make_cache(model, "tova", 8)
    assert cache.parallel is SINGLE and all(layer.parallel is SINGLE for layer in cache.layers)
    stats = cache.stats()
    assert total_stats(stats, SINGLE) is stats


def test_a_sharded_model_is_recognised_and_an_uneven_head_split_refused():
    from kvprune.distributed import tensor_parallel_of

    model = tiny_model("llama")  # 4 query / 2 KV heads
    model._tp_size, model._device_mesh = 2, _Mesh(2)
    tp = tensor_parallel_of(model)
    assert (tp.size, tp.rank, tp.group) == (2, 1, "group")
    assert tp.local_range(2) == (1, 2) and tp.local_range(4) == (2, 4) and tp.head_offset(1) == 1
    model._tp_size, model._device_mesh = 4, _Mesh(4)  # 2 KV heads over 4 ranks: transformers would replicate
    with pytest.raises(kvprune.UnsupportedArchitectureError, match="divides 2"):
        kvprune.make_cache(model, "tova", 8)
