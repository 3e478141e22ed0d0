"""A2SF's forgetting factor and recent window on SmolLM2-135M-Instruct: QA accuracy and continuation NLL.

    python benchmarks/real_a2sf_sweep.py --alphas 0.1,0.3,0.6,1.0 --recents 0,0.25,0.5 --budget 0.25

QA: the real-text suite at 1K tokens, query-aware and query-agnostic (the usable tasks), with 95 %
Wilson intervals. NLL: held-out prose (standard-library docstrings the suite's seed did not draw),
prompt compressed to the budget, then the continuation teacher-forced against the compressed cache;
reported as the mean NLL increase over the full cache. alpha = 1.0 is H2O's accumulated attention.
"""

from __future__ import annotations

import argparse
import random

import torch
from real_model_suite import wilson

from kvprune.eval.fidelity import fidelity, full_reference
from kvprune.eval.qa import run_qa
from kvprune.eval.realtext import build_real_suite, chat_prompt, haystack_paragraphs
from kvprune.models import load_smollm2


def prose_sequences(tok, n: int, length: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``length`` tokens of consecutive haystack paragraphs from random starts."""
    rng = random.Random(seed)
    paras = haystack_paragraphs()
    out = []
    for _ in range(n):
        i, ids = rng.randrange(len(paras)), []
        while len(ids) < length:
            ids += tok.encode(paras[i % len(paras)] + "\n", add_special_tokens=False)
            i += 1
        out.append(ids[:length])
    return torch.tensor(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", default="0.1,0.3,0.6,1.0")
    ap.add_argument("--recents", default="0,0.25,0.5")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--n", type=int, default=8, help="QA examples per task")
    ap.add_argument("--protocols", default="query_aware,query_agnostic")
    ap.add_argument("--tasks", default="niah_single,niah_multikey,qa_distractor,vartrack")
    ap.add_argument("--sequences", type=int, default=6)
    ap.add_argument("--sequence-length", type=int, default=768)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    examples = build_real_suite(tok, seed=args.seed, n_per_task=args.n, lengths=[1024], tasks=args.tasks.split(","))
    seqs = prose_sequences(tok, args.sequences, args.sequence_length, seed=1000 + args.seed)
    protocols = args.protocols.split(",")
    print(f"budget {args.budget}; QA: {len(examples)} examples at 1K (seed {args.seed}); NLL: {len(seqs)} prose windows "
          f"of {args.sequence_length} tokens, first half compressed")
    print("| alpha | recent | " + " | ".join(f"QA {p} (95 % CI)" for p in protocols) + " | NLL increase |")
    print("|---|---|" + "---|" * len(protocols) + "---|")
    budget_tokens = round(args.budget * args.sequence_length // 2)
    reference = full_reference(model, seqs, prompt_len=args.sequence_length // 2)
    for alpha in [float(a) for a in args.alphas.split(",")]:
        for recent in [float(r) if "." in r else int(r) for r in args.recents.split(",")]:
            params = {"alpha": alpha, "recent": recent}
            cells = []
            for protocol in protocols:
                ans = run_qa(model, tok, examples, "a2sf", args.budget, prompt=chat_prompt(tok), stop_strings=(),
                             protocol=protocol, **params)
                k = sum(a.correct for a in ans)
                lo, hi = wilson(k, len(ans))
                cells.append(f"{k / len(ans):.3f} ({lo:.2f}-{hi:.2f})")
            res = fidelity(model, seqs, "a2sf", budget_tokens, prompt_len=args.sequence_length // 2, reference=reference,
                           **params)
            print(f"| {alpha} | {recent} | " + " | ".join(cells) + f" | {res.nll_increase:.4f} |", flush=True)


if __name__ == "__main__":
    main()
