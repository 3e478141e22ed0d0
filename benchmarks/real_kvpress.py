"""kvprune and kvpress side by side on SmolLM2-135M-Instruct and the real-text suite, both protocols.

    python benchmarks/real_kvpress.py --kvpress-python .venv-kvpress/bin/python --n 3 --ratios 0.5,0.75

Same weights (kvpress loads the folder ``kvprune.models.load_smollm2`` converted), same token ids (the
chat prompt split after the context, as ``run_qa`` does), same greedy loop and scoring. kvpress compresses
once, after the prefill (``n_kept = int((1 - r) * n)`` per KV head, n = context tokens query-agnostic, context
+ question query-aware); kvprune runs each policy with kvpress's schedule: an int budget of the same
``n_kept`` and ``prefill_only=True``. Set up kvpress's venv as in ``benchmarks/kvpress_side_by_side.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from real_model_suite import wilson

from kvprune.eval.qa import split_prompt, run_qa
from kvprune.eval.realtext import build_real_suite, chat_prompt, haystack_info
from kvprune.eval.tasks import score_answer
from kvprune.models import load_smollm2, smollm2_dir

PRESSES = ("SnapKV", "TOVA", "KeyDiff", "Knorm", "StreamingLLM", "Random", "ObservedAttention", "ExpectedAttention")
KVPRUNE = ("snapkv", "tova", "keydiff", "knorm", "streaming", "random", "observed", "h2o")
PAIRS = {"snapkv": "SnapKV", "tova": "TOVA", "keydiff": "KeyDiff", "knorm": "Knorm", "streaming": "StreamingLLM",
         "random": "Random", "observed": "ObservedAttention"}


class Worker:
    def __init__(self, python: str) -> None:
        here = Path(__file__).resolve().parent
        self.proc = subprocess.Popen([python, str(here / "_kvpress_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def call(self, **msg) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kvpress-python", default=".venv-kvpress/bin/python")
    ap.add_argument("--n", type=int, default=3, help="examples per task")
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--tasks", default="niah_single,niah_multikey,vartrack")
    ap.add_argument("--ratios", default="0.5,0.75", help="compression ratios r (kvprune budget: 1 - r of the tokens)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--policies", default=",".join(KVPRUNE))
    args = ap.parse_args()
    presses, policies = args.presses.split(","), args.policies.split(",")
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    examples = build_real_suite(tok, seed=args.seed, n_per_task=args.n, lengths=[1024], tasks=args.tasks.split(","))
    prompt = chat_prompt(tok)
    parts = [split_prompt(tok, ex, prompt(ex)) for ex in examples]
    stop = [tok.eos_token_id]
    max_new = max(int(ex["max_new_tokens"]) for ex in examples)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "examples.json"
        path.write_text(json.dumps([{"context_ids": c, "question_ids": q} for c, q in parts]))
        worker = Worker(args.kvpress_python)
        info = worker.call(cmd="init_qa", threads=args.threads, model_dir=str(smollm2_dir()), examples_path=str(path))
    hay = haystack_info()
    print(f"SmolLM2-135M-Instruct, {len(examples)} examples at ~1K tokens (seed {args.seed}, tasks {args.tasks}; "
          f"haystack {hay['sha256']}), 1 thread each side; kvpress {info['versions']}")

    def score(ex, ids: list[int]) -> bool:
        ids = ids[: int(ex["max_new_tokens"])]
        end = next((k for k, t in enumerate(ids) if t in stop), len(ids))
        return bool(score_answer(tok.decode(ids[:end], skip_special_tokens=True).strip(), ex))

    results: dict[tuple, float] = {}
    for protocol in ("query_agnostic", "query_aware"):
        cmd = "qa" if protocol == "query_agnostic" else "qa_aware"
        full = worker.call(cmd=cmd, press="full", ratio=0.0, max_new_tokens=max_new, stop_ids=stop)
        results[(protocol, None, "kvpress", "full")] = sum(score(e, p) for e, p in zip(examples, full["predictions"]))
        results[(protocol, None, "kvprune", "full")] = sum(
            a.correct for a in run_qa(model, tok, examples, "full", prompt=prompt, stop_strings=(), protocol=protocol))
        for r in [float(x) for x in args.ratios.split(",")]:
            for press in presses:
                out = worker.call(cmd=cmd, press=press, ratio=r, max_new_tokens=max_new, stop_ids=stop)
                results[(protocol, r, "kvpress", press)] = sum(score(e, p) for e, p in zip(examples, out["predictions"]))
            for policy in policies:
                ok = 0
                for ex, (c, q) in zip(examples, parts):
                    n = len(c) if protocol == "query_agnostic" else len(c) + len(q)
                    n_kept = int((1 - r) * n)
                    params = {"window": max(1, min(32, n_kept // 2))} if policy == "snapkv" else {}
                    ans = run_qa(model, tok, [ex], policy, n_kept, prompt=prompt, stop_strings=(), protocol=protocol,
                                 prefill_only=True, **params)
                    ok += ans[0].correct
                results[(protocol, r, "kvprune", policy)] = ok
            for (pp, rr, side, method), k in results.items():  # this block's rows now, so a partial run keeps them
                if pp == protocol and rr == r:
                    print(f"partial | {protocol} | {r} | {side} | {method} | {k}/{len(examples)} |", file=sys.stderr,
                          flush=True)
            print(f"done {protocol} r={r}", file=sys.stderr, flush=True)
    assert worker.proc.stdin
    worker.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
    worker.proc.stdin.close()
    worker.proc.wait()
    n = len(examples)
    print("| protocol | r | side | method | accuracy (95 % CI) |")
    print("|---|---|---|---|---|")
    for (protocol, r, side, method), k in results.items():
        lo, hi = wilson(int(k), n)
        print(f"| {protocol} | {'-' if r is None else r} | {side} | {method} | {k / n:.3f} ({lo:.2f}-{hi:.2f}) |")
    print()
    print("| protocol | r | kvprune best | kvpress best | kvprune best >= kvpress best | like-for-like pairs (kvprune / kvpress) |")
    print("|---|---|---|---|---|---|")
    for protocol in ("query_agnostic", "query_aware"):
        for r in [float(x) for x in args.ratios.split(",")]:
            mine = {m: k for (p, rr, s, m), k in results.items() if p == protocol and rr == r and s == "kvprune"}
            theirs = {m: k for (p, rr, s, m), k in results.items() if p == protocol and rr == r and s == "kvpress"}
            bm, bt = max(mine, key=mine.get), max(theirs, key=theirs.get)
            pairs = ", ".join(f"{a} {mine[a] / n:.2f}/{theirs[b] / n:.2f}" for a, b in PAIRS.items()
                              if a in mine and b in theirs)
            print(f"| {protocol} | {r} | {bm} {mine[bm] / n:.3f} | {bt} {theirs[bt] / n:.3f} | "
                  f"{'yes' if mine[bm] >= theirs[bt] else 'no'} | {pairs} |")


if __name__ == "__main__":
    main()
