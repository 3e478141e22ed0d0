"""Amortised eviction (``evict_every=k``) on SmolLM2-135M-Instruct: what k costs in fidelity and memory.

    python benchmarks/real_evict_every.py --every 1,8,32 --policies h2o,tova,a2sf,streaming --budget 128

Held-out prose (standard-library docstrings, as real_a2sf_sweep.py), the first half prefilled and compressed
to the budget, the second half teacher-forced one token at a time with continuous eviction: the mean NLL
increase over the full cache, the greedy agreement with it, and the KV bytes held on average over the run
(k lets a row run up to k - 1 slots over the budget between evictions). Decode-step time: decode_step_cost.py.
"""

from __future__ import annotations

import argparse

import torch
from real_a2sf_sweep import prose_sequences

from kvprune.eval.fidelity import fidelity, full_reference
from kvprune.models import load_smollm2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", default="1,8,32")
    ap.add_argument("--policies", default="h2o,tova,a2sf,streaming")
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--sequence-length", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    seqs = prose_sequences(tok, args.sequences, args.sequence_length, seed=1000 + args.seed)
    prompt = args.sequence_length // 2
    reference = full_reference(model, seqs, prompt_len=prompt)
    print(f"SmolLM2-135M-Instruct, {len(seqs)} prose windows of {args.sequence_length} tokens, first {prompt} prefilled, "
          f"budget {args.budget} slots per (row, KV head), {prompt - 1} teacher-forced decode steps with eviction")
    print("| policy | evict_every | NLL increase | greedy agreement | KV bytes held (mean, vs full) |")
    print("|---|---|---|---|---|")
    for policy in args.policies.split(","):
        for k in [int(x) for x in args.every.split(",")]:
            r = fidelity(model, seqs, policy, args.budget, prompt_len=prompt, reference=reference, evict_every=k)
            print(f"| {policy} | {k} | {r.nll_increase:.4f} | {r.greedy_agreement:.3f} | "
                  f"{r.kv_bytes_mean / r.kv_bytes_mean_full:.3f} |", flush=True)


if __name__ == "__main__":
    main()
