"""Process memory over a long generation: flat once the budget is reached, growing with DynamicCache.

    python benchmarks/memory_long_generation.py [--tokens 10000] [--budget 512] [--policy h2o]

Greedy-decodes ``--tokens`` tokens one step at a time (a 32-token prompt) on the attention-bound
model of ``decode_throughput.py`` and samples the resident set size (``/proc/self/statm``) and the
cache's KV bytes every ``--every`` steps, for the kvprune policy and then for DynamicCache.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import time

import torch
from decode_throughput import attention_bound_model, kv_bytes
from transformers import DynamicCache

import kvprune
from kvprune.integrations.compat import with_cache


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(model, cache, tokens: int, every: int) -> list[tuple[int, float, float]]:
    ids = torch.randint(3, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    samples = []
    with torch.no_grad():
        nxt = model(input_ids=ids, **with_cache(cache), logits_to_keep=1).logits.argmax(-1)
        for step in range(1, tokens + 1):
            nxt = model(input_ids=nxt, **with_cache(cache), logits_to_keep=1).logits.argmax(-1)
            if step % every == 0:
                samples.append((step, rss_mib(), kv_bytes(cache)[0] / 2**20))
    return samples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--policy", default="h2o")
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = attention_bound_model(args.tokens + 64)
    results = {}
    for name, make in ((f"kvprune {args.policy} @{args.budget}", lambda: kvprune.make_cache(model, args.policy, args.budget)),
                       ("DynamicCache", lambda: (model.set_attn_implementation("sdpa"), DynamicCache())[1])):
        gc.collect()
        t = time.perf_counter()
        results[name] = run(model, make(), args.tokens, args.every)
        print(f"{name}: {args.tokens} tokens in {time.perf_counter() - t:.0f}s", flush=True)
    names = list(results)
    print(f"\n{args.tokens}-token greedy generation, 1 row, {torch.get_num_threads()} thread(s); RSS and KV in MiB")
    print("| step | " + " | ".join(f"{n} RSS | {n} KV" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for i, (step, *_) in enumerate(results[names[0]]):
        cells = " | ".join(f"{results[n][i][1]:.1f} | {results[n][i][2]:.2f}" for n in names)
        print(f"| {step} | {cells} |")
    print(f"peak RSS of the process (both runs): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
