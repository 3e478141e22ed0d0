"""What SpAtten saves on stories260K: attention compute, KV memory, bytes read, LSB refetches, and the quality cost.

    python benchmarks/spatten_savings.py [--sequences 32] [--length 128] [--threads 1]

Sequences are sampled from the model (``kvprune.eval.fidelity``); each configuration prefills half
and teacher-forces the rest one decode step at a time, like the fidelity test. Reported per
configuration: NLL increase and greedy agreement against the full cache, the fraction of
query-key products computed, KV bytes held and bytes read by attention against a float32 cache
without pruning, and the fraction of attention rows whose LSBs were fetched.
"""

from __future__ import annotations

import argparse

import torch

import kvprune
from kvprune.eval.fidelity import fidelity, fidelity_metrics, full_reference, sample_sequences, teacher_forced_log_probs
from kvprune.models.llama2c import default_stories260k_path, load_llama2c

CONFIGS: list[tuple[str, dict]] = [
    ("no pruning, float", {"token_ratio": 0.0}),
    ("quant 8+4, tau 0.1", {"token_ratio": 0.0, "quant_bits": (8, 4)}),
    ("quant 6+4, tau 0.1", {"token_ratio": 0.0, "quant_bits": (6, 4)}),
    ("quant 4+4, tau 0.1", {"token_ratio": 0.0, "quant_bits": (4, 4)}),
    ("tokens 0.3", {"token_ratio": 0.3}),
    ("tokens 0.5", {"token_ratio": 0.5}),
    ("heads 0.25", {"token_ratio": 0.0, "head_ratio": 0.25}),
    ("tokens 0.3 + heads 0.25 + quant 8+4", {"token_ratio": 0.3, "head_ratio": 0.25, "quant_bits": (8, 4)}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_llama2c(default_stories260k_path(), attn_implementation="sdpa")
    seqs = sample_sequences(model, args.sequences, args.length, seed=0)
    prompt = args.length // 2
    ref = full_reference(model, seqs, prompt_len=prompt)
    print(f"stories260K, {args.sequences} sampled sequences x {args.length} tokens, prompt {prompt}, "
          f"teacher-forced decode; {torch.get_num_threads()} thread(s)")
    print("| SpAtten config | NLL increase | greedy agreement | QK products | KV bytes | bytes read | rows refetched |")
    print("|---|---|---|---|---|---|---|")
    for label, params in CONFIGS:
        cache = kvprune.make_cache(model, "spatten", **params)
        lp = teacher_forced_log_probs(model, seqs, cache, prompt_len=prompt)
        m = fidelity_metrics(lp, ref.log_probs, seqs[:, prompt:])
        s = cache.spatten_stats()
        print(f"| {label} | {m['nll_increase']:.4f} | {m['greedy_agreement']:.3f} | {s['attention_compute_fraction']:.3f} | "
              f"{s['kv_bytes'] / s['kv_bytes_full_float']:.3f} | {s['bytes_read'] / s['bytes_read_full_float']:.3f} | "
              f"{s['refetch_fraction']:.3f} |")
    equal_memory(model, seqs, ref, prompt)


def equal_memory(model, seqs, ref, prompt: int) -> None:
    """SpAtten beside H2O, A2SF and random holding the same fraction of the tokens seen at every step."""
    print("\nat equal KV memory (each holds the fraction of the tokens seen at every step; SpAtten from layer 1 on):")
    print("| KV fraction | policy | NLL increase | greedy agreement | KV held, mean over the run |")
    print("|---|---|---|---|---|")
    for frac in (0.25, 0.5, 0.75):
        for policy, params in (("spatten", {"token_start": 0.0}), ("h2o", {}), ("a2sf", {}), ("random", {})):
            r = fidelity(model, seqs, policy, frac, prompt_len=prompt, reference=ref, **params)
            print(f"| {frac:.2f} | {policy} | {r.nll_increase:.4f} | {r.greedy_agreement:.3f} | "
                  f"{r.kv_bytes_mean / r.kv_bytes_mean_full:.3f} |")


if __name__ == "__main__":
    main()
