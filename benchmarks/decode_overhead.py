"""Decode-step time of kvprune caches against DynamicCache, at a fixed context, in one run.

    python benchmarks/decode_overhead.py [--context 1024] [--steps 64] [--threads 1]

Prints ms per decode step for DynamicCache, kvprune's full cache (no eviction) and evicting
policies at a budget; ratios are against DynamicCache measured in the same run (interleaved).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from decode_throughput import time_decode
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvprune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=16384,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 1024, (1, args.context))

    def per_step(make):
        return time_decode(model, ids, make(), args.steps) * 1000

    runs = {
        "DynamicCache": lambda: (model.set_attn_implementation("sdpa"), DynamicCache())[1],
        "kvprune full": lambda: kvprune.make_cache(model, "full"),
        **{f"kvprune {p} @{args.budget}": (lambda p=p: kvprune.make_cache(model, p, args.budget))
           for p in ("streaming", "h2o", "a2sf", "tova")},
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, make in runs.items():
            times[name].append(per_step(make))
    base = statistics.median(times["DynamicCache"])
    print(f"context {args.context}, {args.steps} decode steps, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print("| cache | ms / step | vs DynamicCache |")
    print("|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.2f} | {m / base:.2f}x |")


if __name__ == "__main__":
    main()
