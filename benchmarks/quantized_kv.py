"""Quantized KV storage x eviction on SmolLM2-135M-Instruct: accuracy against KV bytes held (issue 18).

    python benchmarks/quantized_kv.py --out benchmarks/results/real/quantized_kv_1k.jsonl --n 6
    python benchmarks/quantized_kv.py --summarise benchmarks/results/real/quantized_kv_1k.jsonl
    python benchmarks/quantized_kv.py --plot benchmarks/results/real/quantized_kv_1k.jsonl \
        --png benchmarks/results/quantized_kv_pareto.png

Grid: storage {float, int8, int4} x budget {0.25, 0.5, 1.0} x protocol, with the policy that works on this
model in each protocol (BENCHMARKS section 8): TOVA query-aware, KeyDiff query-agnostic; budget 1.0 is the
full cache (no eviction). One JSON line per answer (resumable: a finished cell is skipped), with the KV bytes
the cache held at the end of the answer (``stats().kv_bytes``: packed records when quantized).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from real_model_suite import wilson

from kvprune.eval.qa import run_qa
from kvprune.eval.realtext import build_real_suite, chat_prompt, haystack_info
from kvprune.models import load_smollm2

POLICY = {"query_aware": "tova", "query_agnostic": "keydiff"}
TASKS = "niah_single,niah_multikey,vartrack"
BITS = {"float": None, "int8": 8, "int4": 4, "k8v4": (8, 4)}


def _rows(paths: list[Path]) -> list[dict]:
    return [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]


def cells(paths: list[Path], min_full: float = 0.5) -> dict[tuple, dict]:
    """(protocol, storage, budget) -> accuracy, interval, n, mean KV bytes; over the tasks the float full cache can do."""
    rows = _rows(paths)
    full: dict[tuple, list[int]] = {}
    for r in rows:
        if r["budget"] == 1.0 and r["storage"] == "float":
            full.setdefault((r["protocol"], r["task"]), []).append(int(r["correct"]))
    usable = {k for k, v in full.items() if sum(v) / len(v) >= min_full}
    out: dict[tuple, dict] = {}
    for r in rows:
        if (r["protocol"], r["task"]) in usable:
            c = out.setdefault((r["protocol"], r["storage"], r["budget"]), {"k": 0, "n": 0, "bytes": 0, "policy": r["policy"]})
            c["k"] += int(r["correct"])
            c["n"] += 1
            c["bytes"] += r["kv_bytes"]
    for c in out.values():
        c["acc"], c["ci"], c["bytes"] = c["k"] / c["n"], wilson(c["k"], c["n"]), c["bytes"] / c["n"]
    return out


def summarise(paths: list[Path]) -> str:
    out = ["| protocol | policy | storage | budget | accuracy (95 % CI) | KV MiB held | n |", "|---|---|---|---|---|---|---|"]
    order = {"float": 0, "int8": 1, "k8v4": 2, "int4": 3}
    for (protocol, storage, budget), c in sorted(cells(paths).items(), key=lambda kv: (kv[0][0], kv[0][2], order[kv[0][1]])):
        policy = "full" if budget == 1.0 else c["policy"]
        out.append(f"| {protocol} | {policy} | {storage} | {budget} | {c['acc']:.2f} ({c['ci'][0]:.2f}-{c['ci'][1]:.2f}) | "
                   f"{c['bytes'] / 2**20:.2f} | {c['n']} |")
    return "\n".join(out)


def plot(paths: list[Path], png: Path) -> None:
    """Accuracy against KV bytes held, one panel per protocol; the Pareto front (fewest bytes for an accuracy) drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = cells(paths)
    protocols = sorted({k[0] for k in data})
    fig, axes = plt.subplots(1, len(protocols), figsize=(6.0 * len(protocols), 4.4), sharey=True, squeeze=False)
    marks = {"float": "o", "int8": "s", "k8v4": "D", "int4": "^"}
    for ax, protocol in zip(axes[0], protocols):
        pts = [(c["bytes"] / 2**20, c["acc"], s, b) for (p, s, b), c in data.items() if p == protocol]
        for storage, m in marks.items():
            sel = [x for x in pts if x[2] == storage]
            ax.scatter([x[0] for x in sel], [x[1] for x in sel], marker=m, s=50, label=storage)
            for x in sel:
                ax.annotate(f"{x[3]:g}", (x[0], x[1]), textcoords="offset points", xytext=(5, 4), fontsize=7)
        front, best = [], -1.0
        for x in sorted(pts, key=lambda x: (x[0], -x[1])):
            if x[1] > best:
                front.append(x)
                best = x[1]
        ax.step([x[0] for x in front], [x[1] for x in front], where="post", color="grey", linewidth=1, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "32"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"SmolLM2-135M, 1K tokens, {protocol.replace('_', '-')} ({POLICY[protocol]})", fontsize=9)
        ax.set_xlabel("KV MiB held per example, log scale (labels: token budget; 1 = no eviction)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (tasks the full cache can do)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/real/quantized_kv_1k.jsonl"))
    ap.add_argument("--summarise", type=Path, nargs="+")
    ap.add_argument("--plot", type=Path, nargs="+")
    ap.add_argument("--png", type=Path, default=Path("benchmarks/results/quantized_kv_pareto.png"))
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--n", type=int, default=6, help="examples per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--budgets", default="1.0,0.25,0.5")
    ap.add_argument("--storages", default="float,int8,int4")
    ap.add_argument("--protocols", default="query_aware,query_agnostic")
    args = ap.parse_args()
    if args.summarise:
        print(summarise(args.summarise))
        return
    if args.plot:
        plot(args.plot, args.png)
        return
    torch.set_num_threads(1)
    model, tok = load_smollm2()
    info = haystack_info()
    done = set()
    if args.out.exists():
        done = {(r["protocol"], r["storage"], r["budget"]) for r in _rows([args.out])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    examples = build_real_suite(tok, seed=args.seed, n_per_task=args.n, lengths=[args.length], tasks=args.tasks.split(","))
    for budget in [float(b) for b in args.budgets.split(",")]:
        for protocol in args.protocols.split(","):
            for storage in args.storages.split(","):
                if (protocol, storage, budget) in done:
                    continue
                policy = "full" if budget == 1.0 else POLICY[protocol]
                kw = {} if BITS[storage] is None else {"kv_bits": BITS[storage]}
                t0 = time.time()
                answers = run_qa(model, tok, examples, policy, None if budget == 1.0 else budget, prompt=chat_prompt(tok),
                                 protocol=protocol, stop_strings=(), **kw)
                with args.out.open("a") as f:
                    for a in answers:
                        f.write(json.dumps(dict(length=args.length, protocol=protocol, policy=policy, budget=budget,
                                                storage=storage, seed=args.seed, task=a.task, id=a.id, correct=a.correct,
                                                prediction=a.prediction[:80], answer=a.answer, kv_bytes=a.kv_bytes,
                                                prompt_tokens=a.prompt_tokens, prefill_s=round(a.prefill_s, 4),
                                                decode_s=round(a.decode_s, 4), python=info["python"],
                                                haystack=info["sha256"])) + "\n")
                acc = sum(a.correct for a in answers) / len(answers)
                print(f"{protocol} {policy} {storage} {budget}: {acc:.3f} ({len(answers)} ex, {time.time() - t0:.0f} s)",
                      flush=True)


if __name__ == "__main__":
    main()
