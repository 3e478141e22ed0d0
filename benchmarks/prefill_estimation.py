"""Prefill time spent estimating scores, per estimation mode, against a prefill without estimation.

    python benchmarks/prefill_estimation.py [--lengths 2048,4096] [--threads 1]

kvprune's prefill runs the real SDPA kernel for the output, then computes only what the policy
observes: nothing (K-norm, full), the last query (TOVA), the last ``w`` queries (SnapKV) or blocked
weighted column sums over every query (H2O, A2SF). The overhead is each policy's prefill time over
kvprune's ``full`` prefill (same attention function, no observation) and over plain transformers
SDPA with ``DynamicCache``, medians of interleaved repeats in one run. The budget is large enough
that nothing is evicted, so only estimation differs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvprune
from kvprune.integrations.compat import with_cache

MODES = {"full": "none", "knorm": "none", "tova": "last_query", "snapkv": "window (32)", "h2o": "all_queries",
         "a2sf": "all_queries (weighted)"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max(lengths) + 8,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    print(f"prefill, random Llama 4 layers, hidden 512, 8 heads / 2 KV heads, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}")
    print("| prompt | policy | observation | prefill (s) | vs kvprune full | vs DynamicCache |")
    print("|---|---|---|---|---|---|")
    for n in lengths:
        ids = torch.randint(3, 1024, (1, n), generator=torch.Generator().manual_seed(n))
        makers = {"DynamicCache": lambda: (model.set_attn_implementation("sdpa"), DynamicCache())[1]}
        makers.update({p: (lambda p=p: kvprune.make_cache(model, p, n + 8)) for p in MODES})
        times: dict[str, list[float]] = {k: [] for k in makers}
        for _ in range(args.repeats):
            for name, make in makers.items():
                cache = make()
                with torch.no_grad():
                    t = time.perf_counter()
                    model(input_ids=ids, **with_cache(cache), logits_to_keep=1)
                    times[name].append(time.perf_counter() - t)
        dyn, full = statistics.median(times["DynamicCache"]), statistics.median(times["full"])
        print(f"| {n} | DynamicCache | - | {dyn:.3f} | - | 1.00x |")
        for p, mode in MODES.items():
            m = statistics.median(times[p])
            print(f"| {n} | {p} | {mode} | {m:.3f} | {m / full:.2f}x | {m / dyn:.2f}x |")


if __name__ == "__main__":
    main()
