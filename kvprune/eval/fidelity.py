"""Fidelity of a pruned KV cache to the full cache on a causal LM, in token-id space (no tokenizer).

Sequences are sampled from the model itself; each is prefilled up to ``prompt_len`` and the rest
is teacher-forced one token per decode step, so the policy evicts at every step as in generation.
The next-token distributions are compared with the same procedure under ``policy="full"``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..caches import Budget, PruningCache
from ..errors import InvalidParameterError
from ..integrations import make_cache
from ..integrations.compat import with_cache
from ..policies import Policy

__all__ = [
    "FidelityResult",
    "FullReference",
    "budget_tokens",
    "fidelity",
    "fidelity_metrics",
    "full_reference",
    "sample_sequences",
    "teacher_forced_log_probs",
]


def budget_tokens(frac: float, length: int) -> int:
    """Absolute budget ``round(frac * length)`` (at least 1), so a budget is fixed for the whole sequence."""
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not math.isfinite(frac) or frac <= 0:
        raise InvalidParameterError(f"frac must be a positive finite fraction of the sequence length; got {frac!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise InvalidParameterError(f"length must be an integer >= 1; got {length!r}")
    return max(1, math.floor(frac * length + 0.5))


def sample_sequences(
    model: torch.nn.Module,
    n: int,
    length: int,
    *,
    seed: int = 0,
    bos_id: int = 1,
    temperature: float = 1.0,
) -> torch.LongTensor:
    """``[n, length]`` token ids sampled from BOS with the full cache (pure sampling, no EOS stop), deterministic per seed.

    Sampling from the model itself gives in-distribution text without a tokenizer or a corpus.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidParameterError(f"n must be an integer >= 1; got {n!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise InvalidParameterError(f"length must be an integer >= 2 (BOS plus at least one token); got {length!r}")
    if not temperature > 0:
        raise InvalidParameterError(f"temperature must be > 0; got {temperature!r}")
    device = next(model.parameters()).device
    bos = torch.full((n, 1), bos_id, dtype=torch.long, device=device)
    new = length - 1
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(
            bos,
            attention_mask=torch.ones_like(bos),
            do_sample=True,
            temperature=float(temperature),
            top_k=0,
            top_p=1.0,
            max_new_tokens=new,
            min_new_tokens=new,  # suppresses EOS, so every row has exactly ``length`` tokens
            pad_token_id=bos_id,
        )
    if out.shape != (n, length):
        raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected {(n, length)}")
    return out


def _check_inputs(sequences: torch.Tensor, prompt_len: int) -> None:
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.dtype != torch.long:
        raise InvalidParameterError("sequences must be a LongTensor [n, length] of token ids")
    length = sequences.shape[1]
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or not 1 <= prompt_len < length:
        raise InvalidParameterError(
            f"prompt_len must be an integer in [1, {length - 1}] (the sequence length is {length}); got {prompt_len!r}"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _teacher_force(
    model: torch.nn.Module, sequences: torch.Tensor, cache: PruningCache, prompt_len: int, *, track_bytes: bool = False
) -> tuple[torch.Tensor, float, float, float]:
    """:func:`teacher_forced_log_probs`, the prefill and total decode wall times in seconds, and the KV
    bytes held after each forward averaged over the run (``nan`` unless ``track_bytes``; not timed)."""
    _check_inputs(sequences, prompt_len)
    device = next(model.parameters()).device
    seq = sequences.to(device)
    length = seq.shape[1]
    out: list[torch.Tensor] = []
    held: list[int] = []
    decode_s = 0.0
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        logits = model(input_ids=seq[:, :prompt_len], **with_cache(cache), use_cache=True, logits_to_keep=1).logits
        out.append(torch.log_softmax(logits[:, -1].float(), dim=-1))
        _sync(device)
        prefill_s = time.perf_counter() - t0
        for t in range(prompt_len, length - 1):
            if track_bytes:
                held.append(cache.stats().kv_bytes)
            t1 = time.perf_counter()
            logits = model(input_ids=seq[:, t : t + 1], **with_cache(cache), use_cache=True).logits
            out.append(torch.log_softmax(logits[:, -1].float(), dim=-1))
            _sync(device)
            decode_s += time.perf_counter() - t1
        if track_bytes:
            held.append(cache.stats().kv_bytes)
    return torch.stack(out, dim=1), prefill_s, decode_s, sum(held) / len(held) if held else math.nan


def teacher_forced_log_probs(
    model: torch.nn.Module, sequences: torch.Tensor, cache: PruningCache, *, prompt_len: int
) -> torch.Tensor:
    """Next-token log-probs ``[n, length - prompt_len, vocab]`` (float32) for every continuation target.

    Prefills ``sequences[:, :prompt_len]`` then feeds one true token per forward (real decode steps,
    so the cache evicts at each). Row ``j`` predicts ``sequences[:, prompt_len + j]``; row 0 comes
    from the prefill, which attends to the whole prompt, so it matches the full cache exactly.
    Holds ``n * (length - prompt_len) * vocab`` float32 values: mind the size for large vocabularies.
    """
    return _teacher_force(model, sequences, cache, prompt_len)[0]


def fidelity_metrics(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Mean NLL of ``targets`` under both, greedy agreement and KL(ref || pruned), over all positions.

    Inputs are ``[..., vocab]`` log-probs (log-softmax or raw logits: both are normalised here) and
    ``[...]`` target ids; kept separate from the model loop so it can be checked on hand-made cases.
    """
    if log_probs.shape != ref_log_probs.shape or log_probs.shape[:-1] != targets.shape:
        raise InvalidParameterError(
            f"shape mismatch: log_probs {tuple(log_probs.shape)}, ref_log_probs {tuple(ref_log_probs.shape)}, "
            f"targets {tuple(targets.shape)} (expected [..., vocab], [..., vocab], [...])"
        )
    lp = torch.log_softmax(log_probs.double(), dim=-1)
    ref = torch.log_softmax(ref_log_probs.double(), dim=-1)
    idx = targets.long().unsqueeze(-1)
    nll = -lp.gather(-1, idx).mean()
    nll_full = -ref.gather(-1, idx).mean()
    agree = (lp.argmax(-1) == ref.argmax(-1)).double().mean()
    # KL(ref || pruned) = sum_v p_ref (log p_ref - log p); clamp at 0 against float round-off
    kl = (ref.exp() * (ref - lp)).sum(-1).clamp_min(0).mean()
    return {
        "nll": float(nll),
        "nll_full": float(nll_full),
        "nll_increase": float(nll - nll_full),
        "greedy_agreement": float(agree),
        "kl": float(kl),
    }


@dataclass
class FullReference:
    """The full-cache run on ``sequences``, computed once and shared by every policy's :func:`fidelity`."""

    sequences: torch.Tensor  # [n, length], on CPU
    prompt_len: int
    log_probs: torch.Tensor  # [n, length - prompt_len, vocab] float32
    kv_bytes: int
    kv_bytes_mean: float  # KV bytes held after each forward, averaged over the run

    def matches(self, sequences: torch.Tensor, prompt_len: int) -> bool:
        """Whether this reference was computed for exactly these sequences and prompt length."""
        return (
            self.prompt_len == prompt_len
            and self.sequences.shape == sequences.shape
            and bool(torch.equal(self.sequences, sequences.detach().cpu()))
        )


def full_reference(model: torch.nn.Module, sequences: torch.Tensor, *, prompt_len: int) -> FullReference:
    """Run the same prefill + teacher-forced decode with ``policy="full"`` (no eviction)."""
    cache = make_cache(model, "full")
    lp, _, _, held = _teacher_force(model, sequences, cache, prompt_len, track_bytes=True)
    return FullReference(sequences.detach().cpu().clone(), prompt_len, lp, cache.stats().kv_bytes, held)


@dataclass
class FidelityResult:
    """Fidelity of one (policy, budget) to the full cache, averaged over every scored token of every sequence."""

    policy: str
    budget: int | float | None
    nll: float
    nll_full: float
    nll_increase: float
    greedy_agreement: float
    kl: float
    kv_bytes: int  # held at the end
    kv_bytes_full: int
    #: held after each forward, averaged over the run: equal budgets hold equal memory throughout only if
    #: these agree too (an int budget holds everything until it fills; a ratio budget prunes from the start)
    kv_bytes_mean: float
    kv_bytes_mean_full: float
    n_sequences: int
    n_tokens: int
    prefill_s: float  # wall seconds per sequence (the batched prefill divided by n_sequences)
    decode_s: float  # wall seconds per sequence of all its teacher-forced decode steps (batched, divided)
    policy_params: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (e.g. one row of a DataFrame)."""
        return asdict(self)


def fidelity(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    policy: str | Policy,
    budget: int | float | Budget | None,
    *,
    prompt_len: int,
    reference: FullReference | None = None,
    **policy_params: Any,
) -> FidelityResult:
    """Fidelity of ``policy`` at ``budget`` to the full cache on ``sequences`` (one batch, no padding).

    Pass ``reference=full_reference(...)`` to reuse the full-cache run across policies; without it
    the reference is computed here. ``budget`` is an int (slots) or a float ratio of tokens seen.
    """
    _check_inputs(sequences, prompt_len)
    if reference is None:
        reference = full_reference(model, sequences, prompt_len=prompt_len)
    elif not reference.matches(sequences, prompt_len):
        raise InvalidParameterError("reference was computed for other sequences or another prompt_len")
    cache = make_cache(model, policy, budget, **policy_params)
    lp, prefill_s, decode_s, held = _teacher_force(model, sequences, cache, prompt_len, track_bytes=True)
    targets = sequences[:, prompt_len:].to(lp.device)
    n = int(sequences.shape[0])
    metrics = fidelity_metrics(lp, reference.log_probs.to(lp.device), targets)
    return FidelityResult(
        policy=cache.policy.name,
        budget=budget if not isinstance(budget, Budget) else (budget.tokens if budget.tokens is not None else budget.ratio),
        kv_bytes=cache.stats().kv_bytes,
        kv_bytes_full=reference.kv_bytes,
        kv_bytes_mean=held,
        kv_bytes_mean_full=reference.kv_bytes_mean,
        n_sequences=n,
        n_tokens=int(targets.numel()),
        prefill_s=prefill_s / n,
        decode_s=decode_s / n,
        policy_params=dict(policy_params),
        **metrics,
    )
