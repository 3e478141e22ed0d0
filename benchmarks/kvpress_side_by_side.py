"""kvprune side by side with NVIDIA's kvpress: same model weights, same token ids, same compression ratio.

    python benchmarks/kvpress_side_by_side.py [--ratios 0.25 0.5 0.75] [--kvpress-python .venv-kvpress/bin/python]
                                              [--repeats 3] [--out /tmp/kvpress_results.md] [--no-qa]

kvpress 0.5.x pins ``transformers<5.3`` while kvprune's own environment runs a newer transformers, so
kvpress runs in its own virtual environment (default ``.venv-kvpress/``; set it up with
``python -m venv .venv-kvpress && .venv-kvpress/bin/pip install torch==2.13.0 && .venv-kvpress/bin/pip
install kvpress==0.5.5 "transformers>=5.2,<5.3"``; torch first, so pip never pulls a CUDA build). This driver runs kvprune in-process and kvpress in a persistent worker
(``benchmarks/_kvpress_worker.py``) that reads the model from a saved Hugging Face folder and the inputs
from files written here; both sides use 1 thread and their runs are interleaved (per ratio and repeat,
the side that goes first alternates) so that a shared, noisy machine affects both alike.

What is measured
----------------
* **stories260K fidelity.** ``--n-seq`` sequences of ``--length`` tokens sampled once from the model (here);
  prefill the first ``--prompt-len`` tokens, then teacher-force the rest one token per decode step.
  NLL increase, greedy agreement and KL against the full cache (each side against its own uncompressed
  run; the two full-cache NLLs are printed and agree). kvpress compresses the prompt's KV to
  ``n_kept = int((1 - r) * prompt_len)`` per KV head once, after prefill, and never evicts while
  decoding. kvprune runs every policy in three modes:

  - ``peak``: int budget ``n_kept + decoded tokens``: the same peak (and final) KV size as kvpress;
    kvprune evicts continuously, so it holds more than kvpress early in decoding and the same at the end;
  - ``one-shot``: ``make_cache(..., n_kept, prefill_only=True)``: exactly kvpress's schedule, the
    prompt compressed to the same size once, then every decoded token kept and nothing scored;
  - ``ratio``: kvprune's normal continuous float budget ``1 - r`` of the tokens seen (less memory than
    kvpress at every decode step: decoded tokens are compressed too).

* **Demo long-document QA** (only when ``kvprune/demo/model`` exists): ``--qa-n`` examples per task at
  ``--qa-length`` tokens (held-out seed), batch 1. The context is prefilled (and compressed), then the
  question, then greedy decoding (``--qa-max-new`` tokens, stop at newline/EOS); exact match.
  kvpress: ``n_kept = int((1 - r) * context_len)``; kvprune ``one-shot`` (budget ``n_kept`` for the
  context, ``prefill_only=True``) and ``peak`` (``n_kept + question + max_new - 1``).

* **Times**: prefill and decode wall seconds per sequence (fidelity: the batched time divided by
  ``--n-seq``; median over ``--repeats``), per example for QA (median over examples, one repeat).
  Quality is deterministic and taken from the first repeat.

SnapKV on both sides uses an observation window of ``min(32, n_kept // 2)`` (kvpress's default 64
does not fit a 64-token prompt; kvprune's default is 32).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache

import kvprune
from kvprune.eval.fidelity import fidelity_metrics, sample_sequences
from kvprune.eval.tasks import exact_match

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _loops import answer_examples, teacher_force  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "_kvpress_worker.py"

POLICIES = ("a2sf", "h2o", "observed", "keydiff", "tova", "snapkv", "streaming", "knorm", "random")
MODES = ("peak", "one-shot", "ratio")
QA_MODES = ("peak", "one-shot")
PRESSES = (
    "SnapKV", "PyramidKV", "TOVA", "ObservedAttention", "ExpectedAttention",
    "AdaKV-ExpectedAttention", "Knorm", "KeyDiff", "StreamingLLM", "Random",
)


def n_kept_for(k_len: int, ratio: float) -> int:
    """kvpress's ``compute_n_kept``: ``max(1, int(k_len * (1 - ratio)))``."""
    return max(1, int(k_len * (1 - ratio)))


def snap_window(n_kept: int) -> int:
    return max(1, min(32, n_kept // 2))


def policy_params(policy: str, n_kept: int) -> dict[str, Any]:
    return {"window": snap_window(n_kept)} if policy == "snapkv" else {}


def mean_kept(cache: Any) -> float:
    if isinstance(cache, DynamicCache):
        lens = [layer.keys.shape[-2] for layer in cache.layers if getattr(layer, "keys", None) is not None]
        return float(sum(lens) / len(lens))
    kept = cache.stats().kept
    return float(sum(k.float().mean() for k in kept) / len(kept))


# ---------------------------------------------------------------------------------------------
# kvprune side
# ---------------------------------------------------------------------------------------------
def make_kvprune_cache(model, policy: str, mode: str, ratio: float, n_kept: int, extra: int):
    """A cache for ``mode``; ``extra`` is what kvpress appends after the prefill."""
    if policy == "dynamic":
        model.set_attn_implementation("sdpa")
        return DynamicCache()
    if policy == "full":
        return kvprune.make_cache(model, "full")
    params = policy_params(policy, n_kept)
    if mode == "peak":
        return kvprune.make_cache(model, policy, n_kept + extra, **params)
    if mode == "one-shot":
        return kvprune.make_cache(model, policy, n_kept, prefill_only=True, **params)
    if mode == "ratio":
        return kvprune.make_cache(model, policy, float(1 - ratio), **params)
    raise ValueError(mode)


def kvprune_teacher_force(model, seqs: torch.Tensor, prompt_len: int, policy: str, mode: str, ratio: float):
    length = seqs.shape[1]
    n_kept = n_kept_for(prompt_len, ratio)
    cache = make_kvprune_cache(model, policy, mode, ratio, n_kept, length - 1 - prompt_len)
    return teacher_force(model, seqs, prompt_len, cache, None, mean_kept)


def kvprune_qa(model, examples: list[dict], policy: str, mode: str, ratio: float, max_new: int, stop: set[int]):
    def setup(n_ctx: int, n_question: int):
        n_kept = n_kept_for(n_ctx, ratio)
        return make_kvprune_cache(model, policy, mode, ratio, n_kept, n_question + max_new - 1), None

    return answer_examples(model, examples, setup, max_new, stop, mean_kept)


# ---------------------------------------------------------------------------------------------
# kvpress worker
# ---------------------------------------------------------------------------------------------
class KvpressWorker:
    def __init__(self, python: str, log_path: Path, threads: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        self.log = open(log_path, "w")  # noqa: SIM115 -- closed in close()
        self.proc = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env, cwd=str(HERE))

    def call(self, cmd: str, **kw: Any) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"kvpress worker exited (see {self.log.name})")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        finally:
            self.log.close()


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def ms(x: float | None) -> str:
    return "–" if x is None else f"{1000 * x:.2f}"


def machine_line(threads: int) -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu or platform.machine()}, {os.cpu_count()} cores, {threads} thread per side; load average "
            f"{load:.1f} at the end of the run (this box is often shared), so absolute times are noisy; both "
            "sides are interleaved so they share the noise")


def error_text(e: Exception) -> str:
    """What a failed configuration's row shows: the exception's first line, shortened."""
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


# ---------------------------------------------------------------------------------------------
# running the two sides
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--kvpress-python", default=str(ROOT / ".venv-kvpress" / "bin" / "python"))
    ap.add_argument("--n-seq", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--presses", nargs="+", default=list(PRESSES))
    ap.add_argument("--no-qa", action="store_true")
    ap.add_argument("--qa-n", type=int, default=8, help="examples per task")
    ap.add_argument("--qa-length", type=int, default=512)
    ap.add_argument("--qa-max-new", type=int, default=8)
    ap.add_argument("--out", default="/tmp/kvpress_results.md")
    return ap.parse_args(argv)


@dataclass
class QaInputs:
    """The QA section's inputs, tokenized here so that both sides read identical token ids."""

    note: str | None = None  # why the section is skipped
    cfg: dict | None = None  # the worker's ``qa`` init argument
    examples: list[dict] | None = None
    model: Any = None
    tok: Any = None
    stop_ids: set[int] = field(default_factory=set)


def prepare_qa(args: argparse.Namespace, tmp: Path) -> QaInputs:
    """Tokenize the held-out demo suite into ``tmp/qa.json`` (nothing when ``--no-qa`` or no demo model)."""
    qa = QaInputs()
    if args.no_qa:
        return qa
    from kvprune.demo import DEMO_MODEL_PATH, demo_model_available, load_demo_model

    if not demo_model_available():
        qa.note = f"QA skipped: no demo model in {DEMO_MODEL_PATH} (it is rebuilt by scripts/train_demo.py)"
        return qa
    from kvprune.eval.tasks import build_suite, format_prompt

    qa.model, tok = load_demo_model(attn_implementation="sdpa")
    qa.tok = tok
    suite = build_suite(seed=1000003, n_per_task=args.qa_n, lengths=(args.qa_length,), tokenizer=tok)
    qa.examples = []
    for ex in suite:
        full = tok.encode(format_prompt(ex))
        ctx = tok.encode(ex["context"])
        if full[: len(ctx)] != ctx:
            raise RuntimeError("context tokens are not a prefix of the prompt's tokens")
        qa.examples.append({"context_ids": ctx, "question_ids": full[len(ctx):],
                            "task": ex["task"], "answer": ex["answer"]})
    (tmp / "qa.json").write_text(json.dumps(qa.examples))
    if tok.eos_token_id is not None:
        qa.stop_ids.add(int(tok.eos_token_id))
    qa.stop_ids.update(tok.encode("\n", add_special_tokens=False)[-1:])
    qa.cfg = {"model_dir": str(DEMO_MODEL_PATH), "examples_path": str(tmp / "qa.json")}
    return qa


def side_order(i: int) -> list[str]:
    """Which side runs first at repeat (or ratio) ``i``: alternating, so that both share the machine's noise."""
    return ["kvprune", "kvpress"] if i % 2 == 0 else ["kvpress", "kvprune"]


def run_ratio(sides: list[str], ratio: float, policies: list[str], modes: tuple[str, ...], presses: list[str],
              on_kvprune, on_kvpress) -> None:
    """Every configuration at one compression ratio, one side after the other in the order ``sides``."""
    for side in sides:
        if side == "kvprune":
            for policy in policies:
                for mode in modes:
                    on_kvprune(("kvprune", policy, mode, ratio), policy, mode, ratio)
        else:
            for press in presses:
                on_kvpress(("kvpress", press, "", ratio), press, ratio)


def run_fidelity(args: argparse.Namespace, model, seqs: torch.Tensor, worker: KvpressWorker,
                 t_start: float) -> tuple[dict[tuple, dict], dict[tuple, list[tuple[float, float]]]]:
    """stories260K fidelity: quality from repeat 0, (prefill, decode) seconds per sequence of every repeat."""
    p = args.prompt_len
    ref, *_ = kvprune_teacher_force(model, seqs, p, "full", "", 0.0)
    targets = seqs[:, p:]
    fid: dict[tuple, dict] = {}
    times: dict[tuple, list[tuple[float, float]]] = defaultdict(list)

    def run_kvprune(key, policy, mode, ratio):
        try:
            lp, pre, dec, kp, ke = kvprune_teacher_force(model, seqs, p, policy, mode, ratio)
        except Exception as e:  # noqa: BLE001 -- a policy that cannot run at this budget is reported, not fatal
            fid.setdefault(key, {"error": error_text(e)})
            return
        if key not in fid:
            fid[key] = {**fidelity_metrics(lp, ref, targets), "kept_after_prefill": kp, "kept_end": ke}
        times[key].append((pre / args.n_seq, dec / args.n_seq))

    def run_kvpress(key, press, ratio):
        r = worker.call("fidelity", press=press, ratio=ratio)
        if "error" in r:
            fid.setdefault(key, {"error": r["error"]})
            return
        if key not in fid:
            fid[key] = r
        times[key].append((r["prefill_s"], r["decode_s"]))

    for rep in range(args.repeats):
        sides = side_order(rep)
        for side in sides:  # uncompressed anchors
            if side == "kvprune":
                run_kvprune(("kvprune", "DynamicCache", "", None), "dynamic", "", 0.0)
                run_kvprune(("kvprune", "full", "", None), "full", "", 0.0)
            else:
                run_kvpress(("kvpress", "full (DynamicCache)", "", None), "full", 0.0)
        for ratio in args.ratios:
            run_ratio(sides, ratio, args.policies, MODES, args.presses, run_kvprune, run_kvpress)
        print(f"[fidelity] repeat {rep + 1}/{args.repeats} done at {time.time() - t_start:.0f} s", file=sys.stderr)
    return fid, times


def run_qa(args: argparse.Namespace, inputs: QaInputs, worker: KvpressWorker, t_start: float) -> dict[tuple, dict]:
    """Demo long-document QA, one repeat: exact match per configuration, median prefill, decode per step."""
    qa: dict[tuple, dict] = {}
    if inputs.examples is None:
        return qa

    def score(res):
        by_task = defaultdict(list)
        for ex, pred in zip(inputs.examples, res["predictions"]):
            text = inputs.tok.decode(pred, skip_special_tokens=True).split("\n")[0]
            by_task[ex["task"]].append(exact_match(text, ex["answer"]))
        allv = [v for vs in by_task.values() for v in vs]
        return {"em": sum(allv) / len(allv), "by_task": {t: sum(v) / len(v) for t, v in by_task.items()},
                "prefill_s": statistics.median(res["prefill_s"]),
                # per decode step: answers differ in length, so a per-example decode time would
                # compare answer lengths (the first answer token comes from the question's forward)
                "decode_s": sum(res["decode_s"]) / max(1, sum(len(g) - 1 for g in res["predictions"])),
                "kept_after_prefill": statistics.mean(res["kept_after_prefill"])}

    def qa_kvprune(key, policy, mode, ratio):
        try:
            qa[key] = score(kvprune_qa(inputs.model, inputs.examples, policy, mode, ratio, args.qa_max_new,
                                       inputs.stop_ids))
        except Exception as e:  # noqa: BLE001 -- reported in the table, not fatal
            qa[key] = {"error": error_text(e)}

    def qa_kvpress(key, press, ratio):
        r = worker.call("qa", press=press, ratio=ratio, max_new_tokens=args.qa_max_new,
                        stop_ids=sorted(inputs.stop_ids))
        qa[key] = r if "error" in r else score(r)

    qa_kvprune(("kvprune", "full", "", None), "full", "", 0.0)
    qa_kvpress(("kvpress", "full (DynamicCache)", "", None), "full", 0.0)
    for i, ratio in enumerate(args.ratios):
        run_ratio(side_order(i), ratio, args.policies, QA_MODES, args.presses, qa_kvprune, qa_kvpress)
    print(f"[qa] done at {time.time() - t_start:.0f} s", file=sys.stderr)
    return qa


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def config_row(key: tuple, r: dict, n_dashes: int, n_empty: int, cells) -> str:
    """A table row: ``side | method | mode`` and then ``cells()``, or for a failed configuration ``n_dashes``
    dashes, the error and ``n_empty`` empty cells."""
    side, name, mode, _ = key
    label = f"{side} | {name} | {mode or '–'}"
    if "error" in r:
        return f"| {label} | {'– | ' * n_dashes}failed: {r['error']} |{' |' * n_empty}"
    return f"| {label} | {cells()} |"


def ok(key: tuple, table: dict[tuple, dict]) -> bool:
    return key in table and "error" not in table[key]


def best_of_each_side(keys: list[tuple], table: dict[tuple, dict], modes: tuple[str, ...], pick) -> dict[str, tuple]:
    """Per kvprune mode and for kvpress, ``pick`` of the configurations among ``keys`` that ran."""
    groups = [(f"kvprune {mode}", lambda k, mode=mode: k[0] == "kvprune" and k[2] == mode) for mode in modes]
    groups.append(("kvpress", lambda k: k[0] == "kvpress"))
    best = {}
    for label, pred in groups:
        cand = [k for k in keys if pred(k) and ok(k, table)]
        if cand:
            best[label] = pick(cand)
    return best


def ratio_tables(ratios: list[float], table: dict[tuple, dict], title, head: str, order, row,
                 modes: tuple[str, ...], pick) -> tuple[list[str], list[tuple[float, dict[str, tuple]]]]:
    """Per ratio, a table of every configuration sorted by ``order``; and per ratio the best of each side."""
    lines, summary = [], []
    for ratio in ratios:
        lines.append(title(ratio))
        lines.append(head)
        keys = sorted((k for k in table if k[3] == ratio), key=order)
        lines.extend(row(k) for k in keys)
        lines.append("")
        summary.append((ratio, best_of_each_side(keys, table, modes, pick)))
    return lines, summary


def best_rows(summary: list[tuple[float, dict[str, tuple]]], quality_ok, times_of, row) -> list[str]:
    """The rows of a best-of-each-side table: each best against kvpress's best, in quality and in time."""
    lines = []
    for ratio, best in summary:
        kp = best.get("kvpress")
        for label, k in best.items():
            if kp is not None and label != "kvpress":
                q_ok = "yes" if quality_ok(k, kp) else "no"
                (pre, dec), (pre_kp, dec_kp) = times_of(k), times_of(kp)
                t_ok = (f"{'yes' if pre <= pre_kp else 'no'} ({pre / pre_kp:.2f}×), "
                        f"{'yes' if dec <= dec_kp else 'no'} ({dec / dec_kp:.2f}×)")
            else:
                q_ok = t_ok = "–"
            lines.append(row(ratio, label, k, q_ok, t_ok))
    return lines


def report_header(args: argparse.Namespace, init: dict, t_start: float) -> list[str]:
    v = init["versions"]
    return [
        "## kvprune vs kvpress, side by side\n",
        f"- command: `python {shlex.join(['benchmarks/kvpress_side_by_side.py', *sys.argv[1:]])}`",
        f"- machine: {machine_line(args.threads)}",
        f"- kvprune side: kvprune {getattr(kvprune, '__version__', '?')}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}, Python {platform.python_version()} (`.venv`)",
        f"- kvpress side: kvpress {v['kvpress']}, transformers {v['transformers']}, torch {v['torch']}, "
        f"Python {v['python']} (`{os.path.relpath(args.kvpress_python, ROOT)}`; kvpress pins transformers<5.3)",
        f"- wall time of the run: {time.time() - t_start:.0f} s",
        "",
    ]


def mean_decode_kv(key: tuple, p: int, D: int) -> float:
    """Keys attended per (row, KV head), averaged over the decode steps (from the budgets, not measured)."""
    side, name, mode, ratio = key
    steps = range(1, D + 1)
    if ratio is None or name.startswith("AdaKV"):
        held = [p + i for i in steps]
    elif side == "kvpress" or mode == "one-shot":
        held = [n_kept_for(p, ratio) + i for i in steps]
    elif mode == "peak":
        held = [min(p + i, n_kept_for(p, ratio) + D) for i in steps]
    else:  # ratio
        held = [min(p + i, math.ceil((p + i) * (1 - ratio) - 1e-9)) for i in steps]
    return sum(held) / len(held)


def fidelity_report(args: argparse.Namespace, fid: dict[tuple, dict], times: dict[tuple, list[tuple[float, float]]],
                    init: dict) -> list[str]:
    """The stories260K section: anchors, a table per ratio, the best of each side."""
    med = {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v)) for k, v in times.items()}
    p = args.prompt_len
    D = args.length - 1 - p
    L: list[str] = []
    L.append("### stories260K: NLL increase on teacher-forced continuations\n")
    L.append(f"{args.n_seq} sequences × {args.length} tokens sampled from the model (seed {args.seed}), prompt "
             f"{p} tokens prefilled, {args.length - 1 - p} tokens teacher-forced one per decode step. "
             f"Full-cache NLL: kvprune side {fid[('kvprune', 'full', '', None)]['nll_full']:.4f}, "
             f"kvpress side {init['nll_full']:.4f}. "
             f"r = compression ratio of the prompt; kvpress keeps int((1-r)·{p}) prompt tokens per KV head and every "
             f"decoded token. kvprune modes: **peak** = int budget int((1-r)·{p}) + {args.length - 1 - p} (same peak/final "
             f"KV size as kvpress, evicting continuously); **one-shot** = the prompt compressed to the same size after "
             f"prefill, then no eviction (kvpress's schedule; `prefill_only=True`); **ratio** = kvprune's "
             f"normal float budget 1-r of tokens seen (smaller KV than kvpress throughout). "
             f"Mean KV in decode = keys each decode step attends to per (row, KV head), averaged over the steps "
             f"(computed from the budgets): the peak mode's quality comes partly from holding more early on. "
             f"KV = tokens held per (row, KV head) after prefill → at the end (mean over layers; AdaKV masks "
             f"pruned keys instead of freeing them, so its KV is not reduced). "
             f"Times: ms per sequence (batched, divided by {args.n_seq}), median of {args.repeats} interleaved repeats. "
             f"Sorted by NLL increase.\n")

    def fid_row(key):
        r = fid[key]
        pre, dec = med.get(key, (None, None))
        return config_row(key, r, 2, 4, lambda: (
            f"{r['kept_after_prefill']:.0f} → {r['kept_end']:.0f} | {mean_decode_kv(key, p, D):.1f} | "
            f"{r['nll_increase']:.4f} | {r['greedy_agreement']:.3f} | {r['kl']:.4f} | {ms(pre)} | {ms(dec)}"))

    head = ("| side | method | mode | KV kept (prefill → end) | mean KV in decode | NLL increase | greedy agreement | KL | "
            "prefill ms/seq | decode ms/seq |\n|---|---|---|---|---|---|---|---|---|---|")
    L.append("No compression (time anchors: the same DynamicCache on both sides shows how far the two "
             "transformers versions differ):\n")
    L.append(head)
    for key in (("kvprune", "DynamicCache", "", None), ("kvprune", "full", "", None), ("kvpress", "full (DynamicCache)", "", None)):
        L.append(fid_row(key))
    L.append("")

    tables, summary = ratio_tables(
        args.ratios, fid, lambda ratio: f"#### r = {ratio} (kvpress keeps {n_kept_for(p, ratio)} of {p} prompt tokens)\n",
        head, lambda k: (fid[k].get("nll_increase", math.inf)), fid_row, MODES,
        lambda cand: min(cand, key=lambda k: fid[k]["nll_increase"]))
    L.extend(tables)

    L.append("#### Best of each side (lowest NLL increase)\n")
    L.append("| r | side / mode | best | NLL increase | greedy agreement | prefill ms/seq | decode ms/seq | "
             "quality ≥ kvpress best | time ≤ kvpress best (prefill, decode) |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    L.extend(best_rows(
        summary, lambda k, kp: fid[k]["nll_increase"] <= fid[kp]["nll_increase"], med.__getitem__,
        lambda ratio, label, k, q_ok, t_ok: (
            f"| {ratio} | {label} | {k[1]} | {fid[k]['nll_increase']:.4f} | {fid[k]['greedy_agreement']:.3f} | "
            f"{ms(med[k][0])} | {ms(med[k][1])} | {q_ok} | {t_ok} |")))
    L.append("")
    return L


def qa_report(args: argparse.Namespace, qa: dict[tuple, dict], inputs: QaInputs) -> list[str]:
    """The demo QA section (or why it was skipped): anchors, a table per ratio, the best of each side."""
    if inputs.note:
        return [f"### Demo long-document QA\n\n{inputs.note}\n"]
    if not qa:
        return []
    tasks = list(dict.fromkeys(ex["task"] for ex in inputs.examples))
    L: list[str] = []
    L.append("### Demo long-document QA: exact match\n")
    L.append(f"kvprune demo model (`kvprune/demo/model`), {args.qa_n} examples per task × {len(tasks)} tasks at "
             f"{args.qa_length} tokens (build_suite seed 1000003, held out), batch 1. The context is prefilled "
             f"and compressed, then the question (not compressed by kvpress), then greedy decoding (≤ {args.qa_max_new} "
             f"tokens). kvpress keeps int((1-r)·context) tokens; kvprune **one-shot** = the same after the context "
             f"prefill, then no eviction; **peak** = int budget that many + question + {args.qa_max_new - 1} (same peak "
             f"KV size, evicting continuously, so the question can still evict context). Times: prefill = median ms "
             f"per example of the context + question forwards (to the first answer token); decode = ms per decode "
             f"step (total decode time / answer tokens after the first); one repeat. Sorted by EM.\n")
    qhead = (f"| side | method | mode | KV kept after context | EM | {' | '.join(tasks)} | prefill ms | decode ms/step |\n"
             f"|---|---|---|---|---|{'---|' * len(tasks)}---|---|")

    def qa_row(key):
        r = qa[key]
        return config_row(key, r, 1, len(tasks) + 2, lambda: (
            f"{r['kept_after_prefill']:.0f} | {r['em']:.3f} | "
            + " | ".join(f"{r['by_task'].get(t, float('nan')):.2f}" for t in tasks)
            + f" | {ms(r['prefill_s'])} | {ms(r['decode_s'])}"))

    L.append("No compression:\n")
    L.append(qhead)
    L.append(qa_row(("kvprune", "full", "", None)))
    L.append(qa_row(("kvpress", "full (DynamicCache)", "", None)))
    L.append("")
    tables, qsummary = ratio_tables(
        args.ratios, qa, lambda ratio: f"#### QA, r = {ratio}\n", qhead, lambda k: -qa[k].get("em", -1), qa_row, QA_MODES,
        # highest EM, ties broken by total time
        lambda cand: max(cand, key=lambda k: (qa[k]["em"], -(qa[k]["prefill_s"] + qa[k]["decode_s"]))))
    L.extend(tables)
    L.append("#### QA, best of each side (highest EM; ties: fastest)\n")
    L.append("| r | side / mode | best | EM | prefill ms | decode ms/step | EM ≥ kvpress best | time ≤ kvpress best (prefill, decode) |")
    L.append("|---|---|---|---|---|---|---|---|")
    L.extend(best_rows(
        qsummary, lambda k, kp: qa[k]["em"] >= qa[kp]["em"], lambda k: (qa[k]["prefill_s"], qa[k]["decode_s"]),
        lambda ratio, label, k, q_ok, t_ok: (
            f"| {ratio} | {label} | {k[1]} | {qa[k]['em']:.3f} | {ms(qa[k]['prefill_s'])} | {ms(qa[k]['decode_s'])} | "
            f"{q_ok} | {t_ok} |")))
    L.append("")
    return L


NOTES = (
    "- kvprune policies not run: `lazyllm` (prunes computation, not KV memory) and `spatten` (its budget "
    "is a fraction of KV bytes, with progressive quantization: not a token compression ratio).",
    "- kvpress presses not run: KVzip (batch 1 only, loads a tokenizer from `config.name_or_path` and asks the "
    "model to \"Repeat the previous context exactly\": needs an instruction-following model), QFilter, "
    "DuoAttention, KVzap, FastKVzip (need pretrained per-model artifacts), ThinK (prunes key channels, not "
    "tokens), Finch (needs a delimiter token in the prompt), LagKV (default lag 128 > a 64-token prompt), "
    "Decoding/PrefillDecoding presses (compress while decoding: outside the compress-once comparison).",
    "- ObservedAttentionPress needs attention weights, so it runs on an eager-attention copy of the model "
    "(its times include eager attention); every other configuration on both sides uses SDPA.",
    "- AdaKVPress selects tokens per head by masking the others with a fake key (kvpress's attention patch), "
    "so it does not free KV memory (its KV column shows the physical size).",
    "- A failed row shows the exception. PyramidKVPress gives layers different cache lengths; in the QA "
    "protocol the question is one multi-token forward (as in kvpress's own pipeline) and transformers "
    "builds one mask for all layers, so SDPA can get mismatched shapes; single-token decode steps "
    "(stories260K) need no mask and run.",
    "- SnapKV (kvpress SnapKVPress/PyramidKVPress and kvprune snapkv) uses an observation window of "
    "min(32, n_kept // 2) on both sides.",
)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if not Path(args.kvpress_python).exists():
        sys.exit(f"no kvpress python at {args.kvpress_python}; create the venv (see this script's docstring) "
                 "or pass --kvpress-python")

    from kvprune.models.llama2c import default_stories260k_path, load_llama2c

    tmp = Path(tempfile.mkdtemp(prefix="kvpress_sbs_"))
    model = load_llama2c(default_stories260k_path(), attn_implementation="sdpa").eval()
    model.save_pretrained(tmp / "stories260k")
    seqs = sample_sequences(model, args.n_seq, args.length, seed=args.seed)
    torch.save(seqs, tmp / "seqs.pt")
    qa_inputs = prepare_qa(args, tmp)  # token ids fixed here, so both sides read identical inputs

    worker = KvpressWorker(args.kvpress_python, tmp / "worker.log", args.threads)
    try:
        init = worker.call("init", threads=args.threads, model_dir=str(tmp / "stories260k"),
                           seq_path=str(tmp / "seqs.pt"), prompt_len=args.prompt_len, qa=qa_inputs.cfg)
        if "error" in init:
            raise RuntimeError(f"kvpress worker init failed: {init['error']} (log: {tmp / 'worker.log'})")
        fid, times = run_fidelity(args, model, seqs, worker, t_start)
        qa = run_qa(args, qa_inputs, worker, t_start)
    finally:
        worker.close()

    text = "\n".join([*report_header(args, init, t_start), *fidelity_report(args, fid, times, init),
                      *qa_report(args, qa, qa_inputs), "### Notes\n", *NOTES, ""])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"\n(written to {args.out}; inputs and the worker log in {tmp})", file=sys.stderr)


if __name__ == "__main__":
    main()
