"""Decode throughput against context length at a fixed KV budget, on an attention-bound model.

    python benchmarks/decode_throughput.py [--contexts 1024,2048,4096,8192] [--budget 512] [--threads 1]

The model is a random-initialised Llama with 2 layers, 4 heads of width 128 (no GQA), a narrow MLP
and a small vocabulary, so that a decode step's cost is dominated by attention over the cache.
For each context: prefill it once per cache, then time ``--steps`` greedy decode steps; tokens/s for
DynamicCache and kvprune policies at ``--budget`` slots; ratios against DynamicCache in the same run.
Also prints the KV bytes held against ``budget / context`` of the full cache (plus metadata).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvprune
from kvprune.integrations.compat import with_cache


def attention_bound_model(max_positions: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=128,
                         max_position_embeddings=max_positions, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def time_decode(model, ids: torch.Tensor, cache, steps: int) -> float:
    """Prefill ``ids`` into ``cache``, then seconds per greedy decode step over ``steps`` steps."""
    with torch.no_grad():
        nxt = model(input_ids=ids, **with_cache(cache), logits_to_keep=1).logits.argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            nxt = model(input_ids=nxt, **with_cache(cache), logits_to_keep=1).logits.argmax(-1)
    return (time.perf_counter() - t) / steps


def kv_bytes(cache) -> tuple[int, int]:
    """(KV bytes, metadata bytes) of a kvprune cache or a DynamicCache."""
    if isinstance(cache, DynamicCache):
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers), 0
    st = cache.stats()
    return st.kv_bytes, st.metadata_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="1024,2048,4096,8192")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--policies", default="h2o,a2sf,tova,streaming")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [int(x) for x in args.contexts.split(",")]
    model = attention_bound_model(max(contexts) + args.steps + 8)
    makers = {"DynamicCache": lambda: (model.set_attn_implementation("sdpa"), DynamicCache())[1]}
    for p in args.policies.split(","):
        makers[f"{p} @{args.budget}"] = lambda p=p: kvprune.make_cache(model, p, args.budget)
    print(f"decode throughput, {args.steps} steps after a prefill, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}; model: 2 layers, 4 heads x 128, no GQA, MLP 512")
    print("| context | cache | tokens/s | vs DynamicCache | KV bytes | KV / full | metadata / full |")
    print("|---|---|---|---|---|---|---|")
    for n in contexts:
        ids = torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(n))
        speeds: dict[str, list[float]] = {k: [] for k in makers}
        held: dict[str, tuple[int, int]] = {}
        for _ in range(args.repeats):
            for name, make in makers.items():
                cache = make()
                speeds[name].append(1.0 / time_decode(model, ids, cache, args.steps))
                held[name] = kv_bytes(cache)
                del cache
        base = statistics.median(speeds["DynamicCache"])
        full = held["DynamicCache"][0]
        for name, s in speeds.items():
            m = statistics.median(s)
            kv, meta = held[name]
            print(f"| {n} | {name} | {m:.1f} | {m / base:.2f}x | {kv} | {kv / full:.4f} | {meta / full:.4f} |")
    print("(budget / context: " + ", ".join(f"{n}: {args.budget / (n + args.steps):.4f}" for n in contexts) + ")")


if __name__ == "__main__":
    main()
