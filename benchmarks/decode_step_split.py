"""Where a decode step's time goes: update, mask, attention, scores, selection, gather, and the rest of the model.

    python benchmarks/decode_step_split.py --context 2048 --budget 256 --steps 60 [--model smollm2] [--every 1,32]

One thread, in-process. Each kvprune function on the decode path is wrapped with a timer (about 1 us of
overhead per call, so the parts add up to slightly more than an unwrapped step); "model" is the rest of
the step (projections, MLP, norms, RoPE, sampling). Reported per decode step, summed over layers.
"""

from __future__ import annotations

import functools
import platform
from collections import defaultdict

import decode_step_cost
from decode_step_cost import parse_args, policy_makers, setup


from kvprune.caches import decode
from kvprune.caches.layer import PruningLayer
from kvprune.integrations import attention

PARTS = ("update", "mask", "attention", "scores", "selection", "gather")
spent: dict[str, float] = defaultdict(float)
_stack: list[str] = []


def timed(part: str, fn):
    """``fn`` with its time charged to ``part`` (nested timed calls are charged to their own part only)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = decode_step_cost.CLOCK()
        _stack.append(part)
        try:
            return fn(*args, **kwargs)
        finally:
            _stack.pop()
            dt = decode_step_cost.CLOCK() - t
            spent[part] += dt
            if _stack:
                spent[_stack[-1]] -= dt

    return wrapper


def instrument() -> None:
    parts = {"update": "update", "observe_padding": "mask", "attention_allowed": "mask", "evict": "selection",
             "_adopt": "gather", "drop_slots": "gather", "finish": "scores", "fold_row": "scores"}
    for name, part in parts.items():
        # drop_slots: decode evictions since BENCHMARKS §9's first "after"; fold_row: the decode row folded into the
        # scores in one op, since its second
        if hasattr(PruningLayer, name):
            setattr(PruningLayer, name, timed(part, getattr(PruningLayer, name)))
    for name in ("grouped_probs", "grouped_output", "sdpa_output", "decode_row"):
        if hasattr(attention, name):  # decode_row: the observed decode row's one function, since BENCHMARKS §9
            setattr(attention, name, timed("attention", getattr(attention, name)))
    if hasattr(decode, "drop_together"):  # every layer's one-over drop at once (stacked buffers), since BENCHMARKS §9
        decode.drop_together = timed("gather", decode.drop_together)
    attention.estimate_observation = timed("scores", attention.estimate_observation)


def run(model, batch: dict, make, steps: int) -> tuple[float, dict[str, float]]:
    total = decode_step_cost.decode_seconds(model, batch, make(), steps, before=spent.clear)
    return total / steps * 1e3, {p: spent[p] / steps * 1e3 for p in PARTS}


def main() -> None:
    args = parse_args(__doc__, 3, "h2o,a2sf,tova,streaming", "1,32", "evict_every values")
    model, batch = setup(args)
    instrument()
    makers = policy_makers(model, args, [int(x) for x in args.every.split(",")])
    best: dict[str, tuple[float, dict[str, float]]] = {}
    for _ in range(args.rounds):
        for name, make in makers.items():
            r = run(model, batch, make, args.steps)
            if name not in best or r[0] < best[name][0]:
                best[name] = r
    print(f"{args.model}, {platform.machine()}, 1 thread, {args.clock} clock, context {args.context}, budget {args.budget}, "
          f"{args.steps} steps, fastest of {args.rounds} interleaved rounds; ms per decode step")
    print("| cache | total | " + " | ".join(PARTS) + " | model |")
    print("|---|---|" + "---|" * (len(PARTS) + 1))
    for name, (total, parts) in best.items():
        rest = total - sum(parts.values())
        print(f"| {name} | {total:.2f} | " + " | ".join(f"{parts[p]:.2f}" for p in PARTS) + f" | {rest:.2f} |")


if __name__ == "__main__":
    main()
