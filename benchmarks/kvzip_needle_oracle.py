"""Diagnostic: do KVzip's losses at a quarter of the cache come from evicting the needle?

    PYTHONPATH=benchmarks python benchmarks/kvzip_needle_oracle.py --budget 0.25 --ids niah_single-2048-0-10,...

Re-runs examples of §12 (SmolLM2-135M-Instruct, the real-text suite at 2K, query-agnostic) with KVzip, but with
every needle sentence kept in every head and layer: the 24 tokens before each answer's occurrence in the context,
the answer and 2 tokens after it are given an infinite score after the replay, before the eviction (an oracle no
query-agnostic method has). If the answers come back, the needle was what the eviction lost.
"""

from __future__ import annotations

import argparse
import json

import torch

from kvprune.caches.kvzip import KVzipCache
from kvprune.eval.qa import run_qa, split_prompt
from kvprune.eval.realtext import build_real_suite, chat_prompt
from kvprune.models import load_smollm2

#: context slots kept whatever their score, set per example: [(start, stop), ...]
KEPT: list[tuple[int, int]] = []
_compress = KVzipCache.compress


def _compress_keeping_needles(self: KVzipCache) -> None:
    for layer in self.layers:
        if layer.is_initialized:
            for lo, hi in KEPT:
                layer.scores[..., lo:hi] = float("inf")
    _compress(self)


def needle_spans(context_ids: list[int], answer_ids: list[list[int]], before: int = 24,
                 after: int = 2) -> list[tuple[int, int]]:
    """Slot ranges around every occurrence of each answer's tokens in the context (slots are positions before
    eviction)."""
    spans = []
    for a in answer_ids:
        for s in range(len(context_ids) - len(a) + 1):
            if context_ids[s : s + len(a)] == a:
                spans.append((max(0, s - before), s + len(a) + after))
    return spans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", required=True, help="comma-separated example ids of the real-text suite at 2K")
    ap.add_argument("--budget", type=float, default=0.25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    KVzipCache.compress = _compress_keeping_needles
    model, tok = load_smollm2()
    wanted = args.ids.split(",")
    n = max(int(i.rsplit("-", 1)[1]) for i in wanted) + 1
    suite = {e["id"]: e for e in build_real_suite(tok, seed=0, n_per_task=n, lengths=[2048],
                                                  tasks=sorted({i.split("-")[0] for i in wanted}))}
    prompt = chat_prompt(tok)
    right = 0
    for i in wanted:
        ex = suite[i]
        context, _ = split_prompt(tok, ex, prompt(ex))
        KEPT[:] = needle_spans(context, [tok.encode(str(a), add_special_tokens=False) for a in ex["answers"]])
        r = run_qa(model, tok, [ex], "kvzip", args.budget, prompt=prompt, stop_strings=())[0]
        right += r.correct
        print(json.dumps(dict(id=i, kept_spans=KEPT, correct=r.correct, prediction=r.prediction[:24],
                              answer=ex["answer"])), flush=True)
    print(f"{right}/{len(wanted)} right with every needle sentence kept (kvzip at {args.budget})")


if __name__ == "__main__":
    main()
