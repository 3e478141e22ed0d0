"""Held-out documents and exact match: teacher-forced (quick, during training) and with ``generate``."""

from __future__ import annotations

import torch

from kvprune.eval.tasks import build_suite, exact_match, format_prompt
from kvprune.integrations.compat import with_cache

from .common import EOS, EVAL_SEED, PAD


def heldout(n_per_task: int, length: int) -> list[dict]:
    return build_suite(seed=EVAL_SEED, n_per_task=n_per_task, lengths=(length,))


@torch.no_grad()
def quick_eval(model, tok, examples: list[dict], batch: int = 8) -> dict[str, float]:
    """Exact match of greedy decoding, per task, computed teacher-forced in one forward per batch.

    Greedy decoding produces the answer and ``</s>`` exactly when each of those tokens is the argmax
    after the prompt and the answer's preceding tokens, so one forward over ``prompt answer </s>``
    (right-padded) decides it.
    """
    model.eval()
    hits: dict[str, list[float]] = {}
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        prompts = [tok(format_prompt(e)).input_ids for e in chunk]
        answers = [tok(e["answer"], add_special_tokens=False).input_ids + [EOS] for e in chunk]
        rows = [p + a for p, a in zip(prompts, answers)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
        pred = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits.argmax(-1)
        for b, (e, p, a) in enumerate(zip(chunk, prompts, answers)):
            got = pred[b, len(p) - 1: len(p) - 1 + len(a)].tolist()
            hits.setdefault(e["task"], []).append(float(got == a))
    model.train()
    out = {t: sum(v) / len(v) for t, v in hits.items()}
    out["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return out


@torch.no_grad()
def generate_eval(model, tok, examples: list[dict], max_new_tokens: int = 6) -> dict[str, float]:
    """Exact match of greedy ``generate`` (full cache, plain DynamicCache) per task, and overall."""
    from transformers import DynamicCache

    model.eval()
    hits: dict[str, list[float]] = {}
    for e in examples:
        enc = tok(format_prompt(e), return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             **with_cache(DynamicCache(config=model.config)),
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        pred = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
        hits.setdefault(e["task"], []).append(exact_match(pred, e["answer"]))
    out = {t: sum(v) / len(v) for t, v in hits.items()}
    out["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return out
