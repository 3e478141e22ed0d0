"""Long-document QA under a KV budget: greedy answers, exact match, prefill and decode time.

As in RULER/LongBench evaluations of KV compression (and kvpress), the context is prefilled first and
compressed to the budget, then the question is read against the compressed cache, then the answer is
decoded: a one-pass prefill of context and question would answer from the full attention of the
prefill (eviction applies after a forward) and could not tell policies apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..caches import Budget
from ..integrations import make_cache
from ..integrations.compat import with_cache
from ..policies import Policy
from .tasks import exact_match
from .tasks import format_prompt as default_prompt


@dataclass
class Answer:
    """One example's outcome."""

    id: str
    task: str
    prediction: str
    answer: str
    correct: bool
    prompt_tokens: int
    kv_bytes: int
    prefill_s: float
    decode_s: float


@torch.no_grad()
def greedy_decode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Any,
    max_new_tokens: int,
    stop_ids: Iterable[int] = (),
    context_len: int | None = None,
) -> tuple[torch.Tensor, float, float]:
    """Greedy continuation ``[B, <= max_new_tokens]`` with separate prefill and decode wall times.

    With ``context_len`` the first ``context_len`` columns (the context) are one forward and the rest
    (the question) a second one, so the question is read against the compressed context; the prefill
    time covers both (time to the first answer token).
    """
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=input_ids.device)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    cuts = [0, input_ids.shape[1]] if not context_len or context_len >= input_ids.shape[1] else [0, context_len, input_ids.shape[1]]
    t0 = time.perf_counter()
    for a, b in zip(cuts, cuts[1:]):
        logits = model(input_ids=input_ids[:, a:b], attention_mask=attention_mask[:, :b], position_ids=pos[:, a:b],
                       **with_cache(cache), logits_to_keep=1).logits
    t1 = time.perf_counter()
    out, done = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    mask, step_pos = attention_mask, pos[:, -1:]
    for i in range(max_new_tokens):
        nxt = logits[:, -1:].argmax(-1)
        out.append(nxt)
        done |= torch.isin(nxt[:, 0], stop)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        step_pos = step_pos + 1
        logits = model(input_ids=nxt, attention_mask=mask, position_ids=step_pos, **with_cache(cache)).logits
    return torch.cat(out, 1), t1 - t0, time.perf_counter() - t1


def _split(tokenizer: Any, example: dict[str, Any], text: str) -> tuple[list[int], list[int]]:
    """Token ids of the context part (with special tokens) and of the rest of the prompt (the question)."""
    context = example.get("context")
    if isinstance(context, str) and context and text.startswith(context) and len(text) > len(context):
        return tokenizer.encode(context), tokenizer.encode(text[len(context):], add_special_tokens=False)
    return tokenizer.encode(text), []


def run_qa(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    policy: str | Policy = "full",
    budget: int | float | Budget | None = None,
    *,
    max_new_tokens: int = 8,
    batch_size: int = 1,
    prompt: Callable[[dict[str, Any]], str] = default_prompt,
    stop_strings: Sequence[str] = ("\n",),
    on_batch: Callable[[int], None] | None = None,
    separate_question: bool = True,
    **policy_params: Any,
) -> list[Answer]:
    """Answer every example greedily under ``policy``/``budget`` (one fresh cache per batch).

    The context is one forward and the question a second one (``separate_question``), so an evicting
    cache is compressed before it reads the question, as in RULER/LongBench compression evaluations;
    ``separate_question=False`` reads the whole prompt in one forward (LazyLLM's setting, whose
    time-to-first-token is that of the whole prompt).
    """
    device = next(model.parameters()).device
    stop_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for s in stop_strings:
        ids = tokenizer.encode(s, add_special_tokens=False)
        stop_ids.update(ids[-1:])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    parts = [_split(tokenizer, ex, prompt(ex)) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: (len(parts[i][0]), len(parts[i][1])))  # similar lengths share a batch
    answers: dict[int, Answer] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        wc = max(len(parts[i][0]) for i in idx)
        wq = max(len(parts[i][1]) for i in idx)
        ids = torch.full((len(idx), wc + wq), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):  # each part left-padded within its own block
            c, q = parts[i]
            ids[row, wc - len(c) : wc] = torch.tensor(c)
            mask[row, wc - len(c) : wc] = 1
            if q:
                ids[row, wc + wq - len(q) :] = torch.tensor(q)
                mask[row, wc + wq - len(q) :] = 1
        cache = make_cache(model, policy, budget, **policy_params)
        tokens, prefill_s, decode_s = greedy_decode(model, ids.to(device), mask.to(device), cache, max_new_tokens,
                                                    stop_ids, context_len=wc if wq and separate_question else None)
        kv = cache.stats().kv_bytes // len(idx)
        for row, i in enumerate(idx):
            row_tokens = tokens[row].tolist()
            # a row that stopped keeps being fed while others decode: drop what follows its stop token
            end = next((k for k, t in enumerate(row_tokens) if t in stop_ids), len(row_tokens))
            text = tokenizer.decode(row_tokens[:end], skip_special_tokens=True)
            for s in stop_strings:
                text = text.split(s)[0]
            ex = examples[i]
            answers[i] = Answer(
                id=str(ex.get("id", i)),
                task=str(ex.get("task", "qa")),
                prediction=text.strip(),
                answer=str(ex["answer"]),
                correct=bool(exact_match(text, ex["answer"])),
                prompt_tokens=len(parts[i][0]) + len(parts[i][1]),
                kv_bytes=kv,
                prefill_s=prefill_s / len(idx),
                decode_s=decode_s / len(idx),
            )
        if on_batch is not None:
            on_batch(len(idx))
    return [answers[i] for i in range(len(examples))]
