"""Time to first token and decode tokens/s on SmolLM2-135M-Instruct at long contexts: full cache vs a 512 budget.

    python benchmarks/real_decode_speed.py --lengths 2048,4096,8000 --new-tokens 32 --threads 2

Next to each measurement, the limits the model predicts on this CPU: a decode step must read the weights
and the KV it attends (bytes / measured memory bandwidth of a large copy) and do ~2 FLOPs per weight plus
the attention's (FLOPs / measured matmul throughput); the larger of the two is the floor.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from transformers import DynamicCache

import kvprune
from kvprune.eval.realtext import haystack_paragraphs
from kvprune.integrations.compat import with_cache
from kvprune.models import load_smollm2


def machine_rates() -> tuple[float, float]:
    """(bytes/s of a 256 MB copy, FLOP/s of a 1024^3 float32 matmul) on this machine and thread count."""
    a = torch.empty(64 * 1024 * 1024)
    b = torch.empty_like(a)
    b.copy_(a)
    t = time.perf_counter()
    for _ in range(3):
        b.copy_(a)
    bw = 3 * 2 * a.nbytes / (time.perf_counter() - t)
    x, y = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x @ y
    t = time.perf_counter()
    for _ in range(5):
        x @ y
    flops = 5 * 2 * 1024**3 / (time.perf_counter() - t)
    return bw, flops


def prose_ids(tok, n: int) -> torch.Tensor:
    ids: list[int] = []
    for p in haystack_paragraphs():
        ids += tok.encode(p + "\n", add_special_tokens=False)
        if len(ids) >= n:
            break
    return torch.tensor([ids[:n]])


def run(model, ids, cache, new_tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of a greedy loop over the cache."""
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(input_ids=ids, **with_cache(cache), logits_to_keep=1).logits
        t1 = time.perf_counter()
        nxt = logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            nxt = model(input_ids=nxt, **with_cache(cache)).logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
    return t1 - t0, new_tokens / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,4096,8000")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--policies", default="h2o,snapkv,streaming")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    bw, flops = machine_rates()
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    print(f"SmolLM2-135M-Instruct float32, {platform.processor() or platform.machine()}, {args.threads} thread(s); "
          f"copy {bw / 1e9:.1f} GB/s, matmul {flops / 1e9:.0f} GFLOP/s; KV {kv_per_token} B/token")
    print("| context | cache | TTFT s | decode tok/s | floor tok/s (bytes, FLOPs) |")
    print("|---|---|---|---|---|")
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = prose_ids(tok, n)
        for name in ["full", *args.policies.split(",")]:
            cache = DynamicCache() if name == "full" else kvprune.make_cache(model, name, args.budget)
            ttft, tps = run(model, ids, cache, args.new_tokens)
            held = n if name == "full" else args.budget
            step_bytes = n_params * 4 + held * kv_per_token
            step_flops = 2 * n_params + 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * held
            floor = min(bw / step_bytes, flops / step_flops)
            print(f"| {n} | {name if name == 'full' else f'{name} {args.budget}'} | {ttft:.2f} | {tps:.1f} | "
                  f"{floor:.0f} ({bw / step_bytes:.0f}, {flops / step_flops:.0f}) |", flush=True)


if __name__ == "__main__":
    main()
