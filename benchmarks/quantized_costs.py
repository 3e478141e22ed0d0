"""Quantized KV storage on SmolLM2-135M-Instruct: fidelity per bit width (and with a simulated float residual
window), and the decode-step cost of reading records block by block (issue 18).

    python benchmarks/quantized_costs.py fidelity --n 4 --prompt 1024 --steps 128
    python benchmarks/quantized_costs.py step --contexts 1024,4096 --steps 30 --rounds 3

fidelity: teacher-forced next-token log-probs over real prose (the suite's haystack), each storage against the
float cache (no eviction): mean NLL increase, mean KL(float || storage), top-1 agreement. "int4+rN" keeps the
newest N tokens' keys and values in float (KIVI's residual window), simulated from a float shadow of the stream.
step: median ms per decode step (process CPU time, one thread, interleaved rounds), float against int8/int4
records read block by block, and against int4 read through a full float copy per step (``attach_attention(None)``).
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from decode_step_cost import step_ms

import kvprune
from kvprune.caches.quantized import QuantizedLayer
from kvprune.eval.fidelity import fidelity_metrics, teacher_forced_log_probs
from kvprune.eval.realtext import haystack_paragraphs
from kvprune.models import load_smollm2


class _Residual(QuantizedLayer):
    """Simulation: attention reads the newest ``window`` tokens in float (no eviction, one row: slot = position)."""

    window = 0

    def update(self, key_states, value_states, *args, **kwargs):
        old = getattr(self, "shadow", None)
        new = (key_states, value_states)
        self.shadow = new if old is None else tuple(torch.cat([a, b], dim=-2) for a, b in zip(old, new))
        return super().update(key_states, value_states, *args, **kwargs)

    def float_keys(self):
        out = super().float_keys()
        out[..., -self.window :, :] = self.shadow[0][..., -self.window :, :]
        return out

    def float_values(self):
        out = super().float_values()
        out[..., -self.window :, :] = self.shadow[1][..., -self.window :, :]
        return out


def _cache(model, storage: str):
    if storage == "float":
        return kvprune.make_cache(model, "full")
    if "+r" in storage:
        bits, window = storage.split("+r")
        cache = kvprune.make_cache(model, "full", kv_bits=int(bits[3:]))
        for layer in cache.layers:
            layer.__class__ = type("Residual", (_Residual,), {"window": int(window)})
        cache.attach_attention(None)  # the simulation reads float copies
        return cache
    k, _, v = storage.partition("/")
    bits = (int(k[3:]), int(v[3:])) if v else int(k[3:])
    return kvprune.make_cache(model, "full", kv_bits=bits)


def fidelity(args) -> None:
    model, tok = load_smollm2()
    ids = tok("\n\n".join(haystack_paragraphs()), return_tensors="pt").input_ids[0]
    length = args.prompt + args.steps
    starts = [i * (len(ids) - length) // max(1, args.n - 1) for i in range(args.n)]
    storages = args.storages.split(",")
    rows = {s: [] for s in storages}
    for start in starts:
        seq = ids[start : start + length][None]
        ref = teacher_forced_log_probs(model, seq, kvprune.make_cache(model, "full"), prompt_len=args.prompt)
        for s in storages:
            lp = teacher_forced_log_probs(model, seq, _cache(model, s), prompt_len=args.prompt)
            rows[s].append(fidelity_metrics(lp, ref, seq[:, args.prompt :]))
        print(f"sequence at token {start} done", flush=True)
    overlap = _keep_overlap(model, ids, starts, length, args.prompt)
    print(f"\n{args.n} sequences of {args.prompt} prompt + {args.steps} teacher-forced tokens; {platform.processor() or platform.machine()}\n")
    keys = list(rows[storages[0]][0])
    print("| storage | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for s in storages:
        print(f"| {s} | " + " | ".join(f"{statistics.mean(r[k] for r in rows[s]):.4f}" for k in keys) + " |")
    print("\nkeep-set overlap with the float cache (kept positions in common / budget, mean over layers, heads, sequences)\n")
    print("| policy, budget | int8 | k8v4 | int4 |\n|---|---|---|---|")
    for policy, v in overlap.items():
        print(f"| {policy} | " + " | ".join(f"{statistics.mean(v[b]):.3f}" for b in ("int8", "k8v4", "int4")) + " |")


def _kept(cache) -> list[set[int]]:
    return [set(layer.positions[0, h][layer.valid[0, h]].tolist()) for layer in cache.layers for h in range(layer.positions.shape[1])]


def _keep_overlap(model, ids, starts, length, prompt) -> dict[str, dict[str, list[float]]]:
    """Scores from dequantized keys: how much of TOVA's and KeyDiff's keep-set (budget a quarter of the prompt, after
    the teacher-forced steps) is the float cache's."""
    out: dict[str, dict[str, list[float]]] = {}
    for policy in ("tova", "keydiff"):
        budget = prompt // 4
        res = out.setdefault(f"{policy}, {budget}", {"int8": [], "k8v4": [], "int4": []})
        for start in starts:
            seq = ids[start : start + length][None]
            ref = kvprune.make_cache(model, policy, budget)
            teacher_forced_log_probs(model, seq, ref, prompt_len=prompt)
            for name, bits in (("int8", 8), ("k8v4", (8, 4)), ("int4", 4)):
                cache = kvprune.make_cache(model, policy, budget, kv_bits=bits)
                teacher_forced_log_probs(model, seq, cache, prompt_len=prompt)
                res[name] += [len(a & b) / max(1, len(a)) for a, b in zip(_kept(ref), _kept(cache))]
    return out


def step(args) -> None:
    torch.set_num_threads(1)
    model, _ = load_smollm2()
    out = ["| context | cache | float ms | int8 ms | int4 ms | int4 via float copy ms |", "|---|---|---|---|---|---|"]
    for ctx in [int(c) for c in args.contexts.split(",")]:
        ids = torch.randint(100, 20000, (1, ctx), generator=torch.Generator().manual_seed(0))
        for policy, budget in (("full", None), ("tova", ctx // 4)):
            def make(bits, via_copy=False, policy=policy, budget=budget):
                def build():
                    cache = kvprune.make_cache(model, policy, budget, **({} if bits is None else {"kv_bits": bits}))
                    if via_copy:
                        cache.attach_attention(None)
                    return cache
                return build
            caches = {"float": make(None), "int8": make(8), "int4": make(4), "int4 copy": make(4, True)}
            times = {k: [] for k in caches}
            for _ in range(args.rounds):
                for k, build in caches.items():
                    times[k].append(step_ms(model, ids, build, args.steps))
            med = {k: statistics.median(v) for k, v in times.items()}
            label = "full" if budget is None else f"tova {budget}"
            out.append(f"| {ctx} | {label} | {med['float']:.1f} | {med['int8']:.1f} | {med['int4']:.1f} | {med['int4 copy']:.1f} |")
            print(out[-1], flush=True)
    print("\n".join(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("fidelity", "step"))
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--storages", default="int8,int4,int4+r16,int4+r64,int8/int4,int4/int8")
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fidelity(args) if args.what == "fidelity" else step(args)


if __name__ == "__main__":
    main()
