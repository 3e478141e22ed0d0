"""Long-document QA under a KV budget: greedy answers, accuracy, prefill and decode time, in two protocols.

``protocol="query_agnostic"`` (the default; kvpress's and KVzip's setting): the context is prefilled and
compressed to the budget, then the question is read against the compressed cache, then the answer is
decoded. It measures whether a cache can serve questions nobody has asked yet.
``protocol="query_aware"`` (the SnapKV, LazyLLM and A2SF papers' setting): context and question are one
prefill, compressed together, then the answer is decoded.
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
from ..policies import Policy, wants_tokenizer
from ..errors import InvalidParameterError
from .tasks import format_prompt as default_prompt
from .tasks import score_answer

#: the two evaluation protocols (see the module docstring)
PROTOCOLS: tuple[str, ...] = ("query_agnostic", "query_aware")


def with_tokenizer(method: str | object, params: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """``params`` plus ``tokenizer=`` for a method whose cache renders a prompt of its own (KVzip's replay
    instruction), unless the caller passed one."""
    if tokenizer is None or "tokenizer" in params or not wants_tokenizer(method):
        return params
    return {**params, "tokenizer": tokenizer}


def check_protocol(protocol: str) -> str:
    """``protocol`` if valid, else :class:`InvalidParameterError` naming the valid ones."""
    if protocol not in PROTOCOLS:
        raise InvalidParameterError(f"protocol must be one of {PROTOCOLS}; got {protocol!r}")
    return protocol


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


def split_prompt(tokenizer: Any, example: dict[str, Any], text: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt up to the end of the context (with special tokens) and of the rest (the
    question, and for chat prompts the template's tail and answer prefix)."""
    context = example.get("context")
    end = text.find(context) + len(context) if isinstance(context, str) and context and context in text else -1
    if 0 < end < len(text):
        return tokenizer.encode(text[:end]), tokenizer.encode(text[end:], add_special_tokens=False)
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
    protocol: str = "query_agnostic",
    **policy_params: Any,
) -> list[Answer]:
    """Answer every example greedily under ``policy``/``budget`` (one fresh cache per batch).

    ``protocol="query_agnostic"``: the context is one forward and the question a second one, so an
    evicting cache is compressed before it reads the question (RULER/LongBench compression evaluations,
    kvpress); ``"query_aware"`` reads the whole prompt in one forward (the SnapKV, A2SF and LazyLLM
    papers; LazyLLM's time to first token is that of the whole prompt). An example's own
    ``max_new_tokens`` and ``match`` rule (see :func:`kvprune.eval.tasks.score_answer`) take precedence.
    """
    check_protocol(protocol)
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not (ex.get("answers") or "answer" in ex):
            raise InvalidParameterError(f"example {i} has no 'answer' (or 'answers'); each example is a dict with "
                                        "'context', 'question' and 'answer'")
    device = next(model.parameters()).device
    stop_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for s in stop_strings:
        ids = tokenizer.encode(s, add_special_tokens=False)
        stop_ids.update(ids[-1:])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    parts = [split_prompt(tokenizer, ex, prompt(ex)) for ex in examples]
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
        limits = [int(examples[i].get("max_new_tokens") or max_new_tokens) for i in idx]
        cache = make_cache(model, policy, budget, **with_tokenizer(policy, policy_params, tokenizer))
        tokens, prefill_s, decode_s = greedy_decode(model, ids.to(device), mask.to(device), cache, max(limits), stop_ids,
                                                    context_len=wc if wq and protocol == "query_agnostic" else None)
        kv = cache.stats().kv_bytes // len(idx)
        for row, i in enumerate(idx):
            row_tokens = tokens[row].tolist()[: limits[row]]
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
                correct=bool(score_answer(text, ex)),
                prompt_tokens=len(parts[i][0]) + len(parts[i][1]),
                kv_bytes=kv,
                prefill_s=prefill_s / len(idx),
                decode_s=decode_s / len(idx),
            )
        if on_batch is not None:
            on_batch(len(idx))
    return [answers[i] for i in range(len(examples))]
