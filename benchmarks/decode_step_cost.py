"""Decode-step cost of continuous eviction against the same cache without eviction, and amortised eviction.

    python benchmarks/decode_step_cost.py --context 2048 --budget 256 --steps 60 --rounds 5 [--model smollm2]
        [--budget 0.125] [--short-row 100]

One thread, in-process; median ms per decode step over interleaved rounds (each round runs every cache
once, after the same random prompt). Caches: ``DynamicCache``; each policy at the budget with eviction at
every step (``evict_every=1``), with amortised eviction (``evict_every=k``), and without eviction after the
prompt (``prefill_only=True``: the same kept keys, nothing scored or evicted while decoding).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

#: the step clock: process CPU time by default (robust to other processes on a shared box; one thread)
CLOCK = time.process_time
from transformers import DynamicCache

import kvprune
from kvprune.integrations.compat import with_cache


def decode_seconds(model, batch: dict, cache, steps: int, before=None) -> float:
    """The prompt ``batch`` (input_ids, and attention_mask for a left-padded batch), then ``steps`` greedy decode
    steps; returns the decode steps' time on ``CLOCK`` (``before()`` runs between the prompt and the steps)."""
    mask = batch.get("attention_mask")
    pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        nxt = model(**batch, position_ids=pos, **with_cache(cache), logits_to_keep=1).logits[:, -1:].argmax(-1)
        if before is not None:
            before()
        t = CLOCK()
        for _ in range(steps):
            step = {"input_ids": nxt}
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                pos = pos[:, -1:] + 1
                step.update(attention_mask=mask, position_ids=pos)
            nxt = model(**step, **with_cache(cache)).logits[:, -1:].argmax(-1)
        return CLOCK() - t


def step_ms(model, batch: dict, make, steps: int) -> float:
    return decode_seconds(model, batch, make(), steps) / steps * 1e3


def parse_args(doc: str, rounds: int, policies: str, every: str, every_help: str) -> argparse.Namespace:
    """The options this benchmark and decode_step_split.py share."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--budget", type=lambda x: float(x) if "." in x else int(x), default=256,
                    help="slots (an int) or a ratio of the tokens seen (a float)")
    ap.add_argument("--short-row", type=int, default=0,
                    help="add a second, left-padded row of this many real tokens (a padded batch of 2)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--policies", default=policies)
    ap.add_argument("--every", default=every, help=every_help)
    ap.add_argument("--model", default="demo", choices=["demo", "smollm2"])
    ap.add_argument("--clock", default="cpu", choices=["cpu", "wall"],
                    help="cpu: this process's CPU time (default; unaffected by other processes); wall: elapsed time")
    return ap.parse_args()


def setup(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """Set the clock and one thread; load the model; a random prompt of ``--context`` tokens (with ``--short-row``,
    a batch of two: the second row left-padded to its last ``--short-row`` tokens)."""
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.model == "demo":
        from kvprune.models import load_demo_model

        model, _ = load_demo_model()
    else:
        from kvprune.models import load_smollm2

        model, _ = load_smollm2()
    if not args.short_row:
        return model, {"input_ids": torch.randint(3, model.config.vocab_size, (1, args.context))}
    ids = torch.randint(3, model.config.vocab_size, (2, args.context))
    mask = torch.ones_like(ids)
    mask[1, : args.context - args.short_row] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def policy_makers(model: torch.nn.Module, args: argparse.Namespace, every: list[int]) -> dict:
    """Each policy at the budget without eviction after the prompt, and with ``evict_every=k`` for each k."""
    makers = {}
    for p in args.policies.split(","):
        makers[f"{p} prefill_only"] = lambda p=p: kvprune.make_cache(model, p, args.budget, prefill_only=True)
        for k in every:
            makers[f"{p} evict_every={k}"] = lambda p=p, k=k: kvprune.make_cache(model, p, args.budget, evict_every=k)
    return makers


def main() -> None:
    args = parse_args(__doc__, 5, "h2o,a2sf,streaming", "8,32", "evict_every values besides 1")
    model, batch = setup(args)
    makers = {"DynamicCache": DynamicCache, **policy_makers(model, args, [1, *[int(x) for x in args.every.split(",")]])}
    times: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(args.rounds):
        for name, make in makers.items():
            times[name].append(step_ms(model, batch, make, args.steps))
    base = statistics.median(times["DynamicCache"])
    rows = f", a second row of {args.short_row} tokens (left-padded)" if args.short_row else ""
    print(f"{args.model}, {platform.machine()}, 1 thread, {args.clock} clock, context {args.context}{rows}, budget "
          f"{args.budget}, {args.steps} steps x {args.rounds} interleaved rounds")
    print("| cache | ms / step (median) | vs DynamicCache | vs same policy prefill_only |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        policy = name.split()[0]
        ref = statistics.median(times[f"{policy} prefill_only"]) if f"{policy} prefill_only" in times else med
        print(f"| {name} | {med:.2f} | {med / base:.2f}x | {med / ref:.2f}x |")


if __name__ == "__main__":
    main()
