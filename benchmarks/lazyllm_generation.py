"""LazyLLM over a whole generation against the plain model: prompt step, first decoding step, later steps, total.

    python benchmarks/lazyllm_generation.py [--model demo|smollm2] --length 2048 --new-tokens 64 \\
        --schedules "same;0,0" [--prune-layers 1,3 --ratios 0.6,0.8]

One thread, process CPU time (robust to other processes on a shared box), greedy decoding in a plain
loop (no ``generate`` overhead on either side), interleaved rounds, the fastest round of each. A
schedule is LazyLLM's decoding ratios: ``same`` (the paper: decoding steps prune like the prompt step)
or one ratio per pruning layer (``0,0``: decoding steps prune nothing, so the first one computes every
token the prompt step deferred, and later steps compute just the new token).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from transformers import DynamicCache

import kvprune
from kvprune.integrations.compat import with_cache


def run(model, ids: torch.Tensor, cache, new_tokens: int) -> list[float]:
    """CPU seconds of the prompt step and of each decoding step."""
    times = []
    with torch.no_grad():
        t = time.process_time()
        nxt = model(input_ids=ids, **with_cache(cache), logits_to_keep=1).logits[:, -1:].argmax(-1)
        times.append(time.process_time() - t)
        for _ in range(new_tokens - 1):
            t = time.process_time()
            nxt = model(input_ids=nxt, **with_cache(cache)).logits[:, -1:].argmax(-1)
            times.append(time.process_time() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", choices=["demo", "smollm2"])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prune-layers", default=None, help="default: the demo's 1,3 or SmolLM2's 0.3,0.6,0.9")
    ap.add_argument("--ratios", default=None, help="default: the demo's 0.6,0.8 or SmolLM2's 0.5,0.5,0.5")
    ap.add_argument("--schedules", default="same;0,0", help="decoding ratios per run, ';'-separated")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.model == "demo":
        from kvprune.demo import load_demo_model
        from kvprune.eval.tasks import build_suite, format_prompt

        model, tok = load_demo_model()
        ex = build_suite(seed=0, n_per_task=1, lengths=[args.length], tokenizer=tok)[0]
        ids = tok(format_prompt(ex), return_tensors="pt").input_ids
        layers, ratios = args.prune_layers or "1,3", args.ratios or "0.6,0.8"
    else:
        from kvprune.eval.realtext import build_real_suite, chat_prompt
        from kvprune.models import load_smollm2

        model, tok = load_smollm2()
        ex = build_real_suite(tok, seed=0, n_per_task=1, lengths=[args.length], tasks=["niah_single"])[0]
        ids = tok(chat_prompt(tok)(ex), return_tensors="pt").input_ids
        layers, ratios = args.prune_layers or "0.3,0.6,0.9", args.ratios or "0.5,0.5,0.5"
    prune_layers = tuple(float(x) if "." in x else int(x) for x in layers.split(","))
    prune_ratios = tuple(float(r) for r in ratios.split(","))
    makers = {"plain (DynamicCache, SDPA)": lambda: (model.set_attn_implementation("sdpa"), DynamicCache())[1]}
    for sched in args.schedules.split(";"):
        decode = None if sched == "same" else tuple(float(r) for r in sched.split(","))
        makers[f"LazyLLM, decoding {sched}"] = lambda decode=decode: kvprune.make_cache(
            model, "lazyllm", prune_layers=prune_layers, prune_ratios=prune_ratios, decode_ratios=decode)
    best: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, make in makers.items():
            times = run(model, ids, make(), args.new_tokens)
            if name not in best or sum(times) < sum(best[name]):
                best[name] = times
    plain = sum(best[next(iter(makers))])
    print(f"{args.model}, {platform.machine()}, 1 thread, CPU clock, prompt {ids.shape[1]} tokens, {args.new_tokens} new "
          f"tokens, LazyLLM prune layers {prune_layers} ratios {prune_ratios}; fastest of {args.rounds} rounds")
    print("| run | prompt step (ms) | first decoding step (ms) | later steps (ms, median) | total (ms) | total vs plain |")
    print("|---|---|---|---|---|---|")
    for name, t in best.items():
        later = sorted(t[2:])[len(t[2:]) // 2] if len(t) > 2 else float("nan")
        print(f"| {name} | {t[0] * 1e3:.1f} | {t[1] * 1e3:.1f} | {later * 1e3:.2f} | {sum(t) * 1e3:.0f} | "
              f"{sum(t) / plain:.2f}x |")


if __name__ == "__main__":
    main()
