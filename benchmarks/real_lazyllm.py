"""LazyLLM on SmolLM2-135M-Instruct (30 layers): time to first token and accuracy against the full model.

    python benchmarks/real_lazyllm.py --length 2048 --n 5 --seed 0 \\
        --schedule "0.3,0.6,0.9:0.5,0.5,0.5" --schedule "0.1,0.3:0.5,0.7:0,0.7"

Query-aware (prompt in one forward, as in the paper); each example runs the full model then every
schedule, interleaved, so machine noise hits all alike. A schedule is ``layers:ratios[:decode_ratios]``
(decode ratios omitted = the paper's rule, the same ratios at every step). Tasks default to those the
full model can do at 1K (see BENCHMARKS.md); accuracy with 95 % Wilson intervals.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from real_model_suite import wilson

from kvprune.eval.qa import run_qa
from kvprune.eval.realtext import build_real_suite, chat_prompt, haystack_info
from kvprune.models import load_smollm2
from kvprune.policies.lazyllm import LazyLLM


def parse_schedule(text: str) -> LazyLLM:
    parts = text.split(":")
    layers = tuple(float(x) if "." in x else int(x) for x in parts[0].split(","))
    ratios = tuple(float(x) for x in parts[1].split(","))
    decode = tuple(float(x) for x in parts[2].split(",")) if len(parts) > 2 else None
    return LazyLLM(layers, ratios, decode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--n", type=int, default=5, help="examples per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", default="niah_single,niah_multikey,qa_distractor,vartrack")
    ap.add_argument("--schedule", action="append", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    examples = build_real_suite(tok, seed=args.seed, n_per_task=args.n, lengths=[args.length], tasks=args.tasks.split(","))
    policies = [parse_schedule(s) for s in args.schedule]
    prompt = chat_prompt(tok)
    runs: dict[str, list] = {"full": [], **{s: [] for s in args.schedule}}
    for ex in examples:
        runs["full"] += run_qa(model, tok, [ex], "full", prompt=prompt, stop_strings=(), protocol="query_aware")
        for s, pol in zip(args.schedule, policies):
            runs[s] += run_qa(model, tok, [ex], pol, prompt=prompt, stop_strings=(), protocol="query_aware")
    info = haystack_info()
    print(f"SmolLM2-135M-Instruct, {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
          f"{len(examples)} examples of ~{args.length} tokens (seed {args.seed}; Python {info['python']}, "
          f"haystack {info['sha256']}), query-aware")
    print("| schedule (layers : ratios : decode ratios) | accuracy (95 % CI) | TTFT s (median) | TTFT speedup | "
          "total speedup |")
    print("|---|---|---|---|---|")
    full_ttft = statistics.median(a.prefill_s for a in runs["full"])
    full_total = statistics.median(a.prefill_s + a.decode_s for a in runs["full"])
    for name, answers in runs.items():
        k, n = sum(a.correct for a in answers), len(answers)
        lo, hi = wilson(k, n)
        ttft = statistics.median(a.prefill_s for a in answers)
        total = statistics.median(a.prefill_s + a.decode_s for a in answers)
        print(f"| {name} | {k / n:.3f} ({lo:.2f}-{hi:.2f}) | {ttft:.2f} | {full_ttft / ttft:.2f}x | "
              f"{full_total / total:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
