"""Every method x budget x protocol on SmolLM2-135M-Instruct and the real-text suite; per-example JSONL.

    python benchmarks/real_model_suite.py --out benchmarks/results/real_1k.jsonl --lengths 1024 --n 12
    python benchmarks/real_model_suite.py --summarise benchmarks/results/real_1k.jsonl

Resumable: a (length, protocol, policy, budget, params) run already in the file is skipped, so a long grid
can be stopped and continued. Each line holds one answer with the Python version and haystack hash.
The summary gives accuracy with 95 % Wilson intervals over the tasks the full cache can do.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from kvprune.errors import KVPruneError
from kvprune.eval.qa import PROTOCOLS, run_qa
from kvprune.eval.realtext import REAL_TASKS, build_real_suite, chat_prompt, haystack_info
from kvprune.models import load_smollm2

ALL = ("full", "lazyllm", "a2sf", "h2o", "tova", "snapkv", "observed", "keydiff", "streaming", "knorm", "spatten", "random")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def _key(r: dict) -> tuple:
    return (r["length"], r["protocol"], r["policy"], r["budget"], r.get("params", ""))


def summarise(path: Path, min_full: float = 0.5) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    full = {}
    for r in rows:
        if r["policy"] == "full":
            full.setdefault((r["length"], r["protocol"], r["task"]), []).append(r["correct"])
    usable = {k for k, v in full.items() if sum(v) / len(v) >= min_full}
    out = ["| length | protocol | task | full-cache accuracy | n |", "|---|---|---|---|---|"]
    for (length, protocol, task), v in sorted(full.items()):
        mark = "" if (length, protocol, task) in usable else " (excluded)"
        out.append(f"| {length} | {protocol} | {task}{mark} | {sum(v) / len(v):.2f} | {len(v)} |")
    groups: dict[tuple, list[int]] = {}
    for r in rows:
        if (r["length"], r["protocol"], r["task"]) in usable:
            groups.setdefault(_key(r), []).append(int(r["correct"]))
    out += ["", f"accuracy over the tasks where the full cache scores >= {min_full} (95 % Wilson interval)", "",
            "| length | protocol | policy | budget | accuracy | interval | n |", "|---|---|---|---|---|---|---|"]
    for key, v in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][3]), -sum(kv[1]) / len(kv[1]))):
        lo, hi = wilson(sum(v), len(v))
        out.append(f"| {key[0]} | {key[1]} | {key[2]}{' ' + key[4] if key[4] else ''} | {key[3]} | "
                   f"{sum(v) / len(v):.3f} | {lo:.2f}-{hi:.2f} | {len(v)} |")
    return "\n".join(out)


def plot(paths: list[Path], out: Path, min_full: float = 0.5) -> None:
    """Accuracy against budget per policy, one panel per protocol, over the tasks the full cache can do."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]
    full: dict[tuple, list[int]] = {}
    for r in rows:
        if r["policy"] == "full":
            full.setdefault((r["protocol"], r["task"]), []).append(int(r["correct"]))
    usable = {k for k, v in full.items() if sum(v) / len(v) >= min_full}
    protocols = sorted({r["protocol"] for r in rows})
    fig, axes = plt.subplots(1, len(protocols), figsize=(6.2 * len(protocols) + 1.6, 4.4), sharey=True, squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        acc: dict[tuple, list[int]] = {}
        for r in rows:
            if r["protocol"] == protocol and (protocol, r["task"]) in usable and not r.get("params"):
                acc.setdefault((r["policy"], r["budget"]), []).append(int(r["correct"]))
        for policy in sorted({k[0] for k in acc}):
            pts = sorted((b, sum(v) / len(v)) for (p, b), v in acc.items() if p == policy and b is not None)
            if policy == "full":
                v = acc[("full", None)]
                ax.axhline(sum(v) / len(v), color="black", linestyle="--", linewidth=1, label="full cache")
            elif not pts:
                v = acc[(policy, None)]
                ax.axhline(sum(v) / len(v), linestyle=":", linewidth=1.5, label=f"{policy} (no KV budget)")
            else:
                ax.plot([b for b, _ in pts], [a for _, a in pts], marker="o", label=policy)
        ax.set_title(f"SmolLM2-135M-Instruct, 1K tokens, {protocol.replace('_', '-')}")
        ax.set_xlabel("KV budget (fraction of tokens; SpAtten: of KV memory)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (tasks the full cache can do)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def matrix(paths: list[Path], min_full: float = 0.5) -> str:
    """One row per method, one column per (protocol, budget): accuracy (n) over the tasks the full cache can do."""
    rows = [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]
    full: dict[tuple, list[int]] = {}
    for r in rows:
        if r["policy"] == "full":
            full.setdefault((r["length"], r["protocol"], r["task"]), []).append(int(r["correct"]))
    usable = {k for k, v in full.items() if sum(v) / len(v) >= min_full}
    acc: dict[tuple, list[int]] = {}
    for r in rows:
        if (r["length"], r["protocol"], r["task"]) in usable and not r.get("params"):
            acc.setdefault((r["policy"], r["protocol"], r["budget"]), []).append(int(r["correct"]))
    cols = sorted({(p, b) for (_, p, b) in acc if b is not None})
    head = "| method | " + " | ".join(f"{p.replace('query_', 'q-')} {b}" for p, b in cols) + " |"
    out = [head, "|---|" + "---|" * len(cols)]
    order = sorted({m for m, _, _ in acc}, key=lambda m: (m != "full", m != "lazyllm", m))
    for m in order:
        cells = []
        for p, b in cols:
            v = acc.get((m, p, b)) or acc.get((m, p, None))
            cells.append("-" if not v else f"{sum(v) / len(v):.2f}")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    ns = sorted({len(v) for v in acc.values()})
    out.append(f"\n(examples per cell: {', '.join(map(str, ns))}; full and lazyllm take no budget: their one value is repeated)")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/real_model_suite.jsonl"))
    ap.add_argument("--summarise", type=Path, help="print the summary tables of a results file and exit")
    ap.add_argument("--plot", type=Path, nargs="+", help="results files to plot into --out (a PNG) and exit")
    ap.add_argument("--matrix", type=Path, nargs="+", help="print a method x (protocol, budget) table and exit")
    ap.add_argument("--lengths", default="1024")
    ap.add_argument("--n", type=int, default=8, help="examples per task and length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", default=",".join(REAL_TASKS))
    ap.add_argument("--policies", default=",".join(ALL))
    ap.add_argument("--budgets", default="0.1,0.25,0.5")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS))
    ap.add_argument("--params", default="", help="JSON object of policy parameters (one policy at a time)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.summarise:
        print(summarise(args.summarise))
        return
    if args.plot:
        plot(args.plot, args.out)
        return
    if args.matrix:
        print(matrix(args.matrix))
        return
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    info = haystack_info()
    params = json.loads(args.params) if args.params else {}
    tag = json.dumps(params, sort_keys=True) if params else ""
    done = set()
    if args.out.exists():
        done = {_key(json.loads(line)) for line in args.out.read_text().splitlines() if line.strip()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for length in [int(x) for x in args.lengths.split(",")]:
        examples = build_real_suite(tok, seed=args.seed, n_per_task=args.n, lengths=[length], tasks=args.tasks.split(","))
        for protocol in args.protocols.split(","):
            for policy in args.policies.split(","):
                budgets = [None] if policy in ("full", "lazyllm") else [float(b) for b in args.budgets.split(",")]
                for budget in budgets:
                    if (length, protocol, policy, budget, tag) in done:
                        continue
                    t0 = time.time()
                    try:
                        answers = run_qa(model, tok, examples, policy, budget, prompt=chat_prompt(tok), protocol=protocol,
                                         stop_strings=(), **params)
                    except KVPruneError as err:  # e.g. a KV fraction out of SpAtten's reach: say so, go on
                        print(f"{length} {protocol} {policy} {budget} {tag}: skipped ({err})", flush=True)
                        continue
                    with args.out.open("a") as f:
                        for a in answers:
                            f.write(json.dumps(dict(length=length, protocol=protocol, policy=policy, budget=budget,
                                                    params=tag, seed=args.seed, task=a.task, id=a.id, correct=a.correct,
                                                    prediction=a.prediction[:80], answer=a.answer, kv_bytes=a.kv_bytes,
                                                    prefill_s=round(a.prefill_s, 4), decode_s=round(a.decode_s, 4),
                                                    python=info["python"], haystack=info["sha256"])) + "\n")
                    acc = sum(a.correct for a in answers) / len(answers)
                    print(f"{length} {protocol} {policy} {budget} {tag}: {acc:.3f} ({len(answers)} ex, {time.time() - t0:.0f} s)",
                          flush=True)


if __name__ == "__main__":
    main()
