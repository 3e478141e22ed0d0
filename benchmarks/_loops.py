"""The measurement loops both sides of ``kvpress_side_by_side.py`` run: teacher forcing and greedy QA answers.

No kvprune import: the kvpress worker (``_kvpress_worker.py``) lives in another virtual environment. Each
side passes in what differs: the cache (a kvprune cache or a plain ``DynamicCache``), an optional kvpress
press applied during the compressed prefill, and how to count the keys a cache holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

# the cache keyword of this transformers release (``cache`` from 5.24 on; kvprune.integrations.compat has the
# same rule, but the kvpress worker's environment does not import kvprune)
_CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"


def compressing(press: Any, model) -> contextlib.AbstractContextManager:
    """``press(model)``: a kvpress press applied to the model for one prefill; a no-op when ``press`` is None."""
    return contextlib.nullcontext() if press is None else press(model)


def teacher_force(model, seqs: torch.Tensor, prompt_len: int, cache, press: Any, mean_kept: Callable[[Any], float]):
    """Prefill ``seqs[:, :prompt_len]`` (under ``press``), then feed the rest one token per decode step.

    Returns the log-probabilities that predict tokens ``prompt_len`` to the end (batch × steps × vocab), the
    prefill and decode wall seconds, and ``mean_kept(cache)`` after the prefill and at the end.
    """
    length = seqs.shape[1]
    out = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        with compressing(press, model):
            logits = model(input_ids=seqs[:, :prompt_len], **{_CACHE: cache}, use_cache=True, logits_to_keep=1).logits
        out.append(torch.log_softmax(logits[:, -1].float(), dim=-1))
        t1 = time.perf_counter()
        kept_prefill = mean_kept(cache)
        for t in range(prompt_len, length - 1):
            pos = torch.full((seqs.shape[0], 1), t, dtype=torch.long)
            logits = model(input_ids=seqs[:, t : t + 1], **{_CACHE: cache}, position_ids=pos, use_cache=True).logits
            out.append(torch.log_softmax(logits[:, -1].float(), dim=-1))
        t2 = time.perf_counter()
    return torch.stack(out, dim=1), t1 - t0, t2 - t1, kept_prefill, mean_kept(cache)


def decode_greedy(model, cache, logits: torch.Tensor, step: int, max_new: int, stop: set[int]) -> list[int]:
    """Greedy decoding from the forward that gave ``logits``; the first generated token sits at position ``step``."""
    nxt = int(logits[0, -1].argmax())
    gen = [nxt]
    while nxt not in stop and len(gen) < max_new:
        logits = model(input_ids=torch.tensor([[nxt]]), **{_CACHE: cache},
                       position_ids=torch.tensor([[step]]), use_cache=True).logits
        step += 1
        nxt = int(logits[0, -1].argmax())
        gen.append(nxt)
    return gen


def answer(model, cache, question: torch.Tensor, n_ctx: int, max_new: int, stop: set[int]) -> tuple[list[int], float]:
    """Feed the question after an ``n_ctx``-token context already in ``cache``, then decode greedily.

    Returns the generated ids and ``perf_counter()`` at the first answer token (end of the prefill).
    """
    pos = torch.arange(n_ctx, n_ctx + question.shape[1]).unsqueeze(0)
    logits = model(input_ids=question, **{_CACHE: cache}, position_ids=pos, use_cache=True, logits_to_keep=1).logits
    t_first = time.perf_counter()
    return decode_greedy(model, cache, logits, n_ctx + question.shape[1], max_new, stop), t_first


def answer_examples(model, examples: list[dict], setup: Callable[[int, int], tuple[Any, Any]], max_new: int,
                    stop: set[int], mean_kept: Callable[[Any], float], query_aware: bool = False) -> dict[str, list]:
    """Answer every example (``context_ids``, ``question_ids``) greedily, batch 1: the reply of a QA run.

    ``setup(n, n_question)`` returns ``(cache, press)`` for a compressed prefill of ``n`` tokens followed by
    ``n_question`` question tokens (``press`` None: the cache compresses by itself, or not at all).
    Query-agnostic (default): the context alone is prefilled under the press, then :func:`answer` feeds the
    question; ``query_aware``: context and question are one prefill under the press (``n_question`` 0).
    ``prefill_s`` runs to the first answer token, ``decode_s`` from there to the end of the answer;
    ``kept_after_prefill`` is ``mean_kept(cache)`` after the compressed prefill.
    """
    preds, prefill, decode, kept = [], [], [], []
    with torch.inference_mode():
        for ex in examples:
            if query_aware:
                ids = torch.tensor([ex["context_ids"] + ex["question_ids"]])
                n = ids.shape[1]
                cache, press = setup(n, 0)
                t0 = time.perf_counter()
                with compressing(press, model):
                    logits = model(input_ids=ids, **{_CACHE: cache}, use_cache=True, logits_to_keep=1).logits
                t1 = time.perf_counter()
                kept.append(mean_kept(cache))
                gen = decode_greedy(model, cache, logits, n, max_new, stop)
            else:
                ctx = torch.tensor([ex["context_ids"]])
                q = torch.tensor([ex["question_ids"]])
                n_ctx = ctx.shape[1]
                cache, press = setup(n_ctx, q.shape[1])
                t0 = time.perf_counter()
                with compressing(press, model):
                    model.model(input_ids=ctx, **{_CACHE: cache}, use_cache=True)
                kept.append(mean_kept(cache))
                gen, t1 = answer(model, cache, q, n_ctx, max_new, stop)
            t2 = time.perf_counter()
            preds.append(gen)
            prefill.append(t1 - t0)
            decode.append(t2 - t1)
    return {"predictions": preds, "prefill_s": prefill, "decode_s": decode, "kept_after_prefill": kept}
