"""LazyLLM accuracy and time-to-first-token on the long-document QA suite (embedded demo model).

    python benchmarks/lazyllm_accuracy.py [--lengths 1024,2048] [--n 8] [--ratios 0.5,0.5,0.5]

Exact match of the full model and of LazyLLM on the same generated examples, with the mean prefill
time of each; both measured in one run.
"""

from __future__ import annotations

import argparse

import torch

from kvprune.demo import load_demo_model
from kvprune.eval.qa import run_qa
from kvprune.eval.tasks import build_suite
from kvprune.policies.lazyllm import LazyLLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--n", type=int, default=8, help="examples per task kind and length")
    ap.add_argument("--ratios", default="0.5,0.5,0.5")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_demo_model()
    ratios = tuple(float(r) for r in args.ratios.split(","))
    print(f"demo model, {torch.get_num_threads()} threads; LazyLLM prune ratios {ratios} at 30/60/90% depth")
    print("| length | examples | EM full | EM LazyLLM | TTFT full (s) | TTFT LazyLLM (s) | speedup |")
    print("|---|---|---|---|---|---|---|")
    for length in [int(x) for x in args.lengths.split(",")]:
        examples = build_suite(seed=args.seed, n_per_task=args.n, lengths=[length], tokenizer=tok)
        full = run_qa(model, tok, examples, "full")
        lazy = run_qa(model, tok, examples, LazyLLM(prune_ratios=ratios))
        em = lambda xs: sum(a.correct for a in xs) / len(xs)  # noqa: E731
        t = lambda xs: sum(a.prefill_s for a in xs) / len(xs)  # noqa: E731
        print(f"| {length} | {len(examples)} | {em(full):.3f} | {em(lazy):.3f} | {t(full):.3f} | {t(lazy):.3f} | "
              f"{t(full) / t(lazy):.2f}x |")


if __name__ == "__main__":
    main()
