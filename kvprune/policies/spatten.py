"""SpAtten (arXiv 2012.09852): cascade token pruning, cascade head pruning, progressive quantization.

Token importance ``s_t`` is the attention probability a token receives, summed over the heads still
present, over the queries computed and over layers and decoding steps (Algorithm 1, "cumulative
importance"). After layer ``l`` only the top ``floor(L * (1 - p_l))`` tokens of the ``L`` seen go
on; a pruned token never comes back (cascade). Head importance ``s_h`` sums the L1 magnitude of
each head's attention output the same way; after layer ``l`` the top ``floor(H * (1 - q_l))`` heads
go on. Keys (and values) can be stored as MSB + LSB integer parts: rows are computed from the MSBs
and recomputed with the LSBs when their largest probability is below ``tau`` (Section 3.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import InvalidBudgetError, InvalidParameterError
from .base import keep_top, register_method


def _check_ratio(name: str, r: object) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0.0 <= r < 1.0:
        raise InvalidParameterError(f"{name} is a fraction pruned, in [0, 1); got {r!r}")
    return float(r)


def _ramp(target: float, start: float, n_layers: int) -> list[float]:
    """0 for the first ``round(start * n)`` layers, then a linear ramp reaching ``target`` at layer n-2."""
    first = min(int(round(start * n_layers)), n_layers - 1)
    out = [0.0] * n_layers
    span = (n_layers - 1) - first
    for i in range(first, n_layers):
        out[i] = target if span <= 0 else target * min(1.0, (i - first + 1) / span)
    return out


@register_method
@dataclass
class SpAtten:
    """SpAtten's schedules and selection rules (the forward and the cache do the bookkeeping).

    ``token_ratio`` / ``head_ratio``: fraction of the tokens seen / of the heads pruned after the
    deepest layers, reached by a linear ramp that starts after the first ``token_start`` /
    ``head_start`` fraction of layers (the paper leaves early layers unpruned). ``token_ratios`` /
    ``head_ratios`` give the per-layer cumulative fractions explicitly instead (one per layer).
    ``quant_bits=(msb, lsb)`` turns on progressive quantization (e.g. ``(8, 4)`` or ``(6, 4)``);
    ``quantize_values`` applies it to values too; ``tau`` is the max-probability threshold.
    ``recent`` (not in the paper, default 0): the newest ``recent`` tokens are never pruned, like
    H2O's recent window (the newest token always goes through every layer, as in the paper).
    ``importance="random"`` replaces the attention scores by a fixed random score per token (an
    ablation: the same cascade and budgets, no information), to show what the scores are worth.
    """

    token_ratio: float = 0.5
    head_ratio: float = 0.0
    token_start: float = 0.15
    head_start: float = 0.3
    token_ratios: tuple[float, ...] | None = None
    head_ratios: tuple[float, ...] | None = None
    quant_bits: tuple[int, int] | None = None
    quantize_values: bool = True
    tau: float = 0.1
    recent: int = 0
    importance: str = "attention"

    name: ClassVar[str] = "spatten"
    budget_kind: ClassVar[str] = "kv_fraction"  # a budget is the fraction of KV memory kept
    wants_tokenizer: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_ratio("token_ratio", self.token_ratio)
        _check_ratio("head_ratio", self.head_ratio)
        for name in ("token_start", "head_start"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise InvalidParameterError(f"{name} is a fraction of the depth in [0, 1]; got {v!r}")
        for name in ("token_ratios", "head_ratios"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, tuple(_check_ratio(f"each of {name}", r) for r in v))
        if self.quant_bits is not None:
            bits = tuple(self.quant_bits)
            ok = len(bits) == 2 and all(isinstance(b, int) and not isinstance(b, bool) for b in bits)
            if not ok or not (1 <= bits[0] <= 8 and 1 <= bits[1] <= 8):
                raise InvalidParameterError(f"quant_bits is (msb, lsb) with each in 1..8, e.g. (8, 4); got {self.quant_bits!r}")
            self.quant_bits = bits  # type: ignore[assignment]
        if self.importance not in ("attention", "random"):
            raise InvalidParameterError(f"importance is 'attention' (the paper) or 'random' (ablation); got {self.importance!r}")
        if isinstance(self.recent, bool) or not isinstance(self.recent, int) or self.recent < 0:
            raise InvalidParameterError(f"recent is a number of tokens >= 0; got {self.recent!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 <= self.tau <= 1.0:
            raise InvalidParameterError(f"tau is a probability threshold in [0, 1]; got {self.tau!r}")

    # -- schedules -------------------------------------------------------------------------------
    def _explicit(self, name: str, n_layers: int) -> list[float] | None:
        v = getattr(self, name)
        if v is None:
            return None
        if len(v) != n_layers:
            raise InvalidParameterError(f"{name} needs one ratio per layer ({n_layers}); got {len(v)}")
        return list(v)

    def token_schedule(self, n_layers: int) -> list[float]:
        """``p_l`` per layer: the fraction of the tokens seen that does not go past layer ``l``."""
        return self._explicit("token_ratios", n_layers) or _ramp(self.token_ratio, self.token_start, n_layers)

    def head_schedule(self, n_layers: int) -> list[float]:
        """``q_l`` per layer: the fraction of query heads that does not go past layer ``l``."""
        return self._explicit("head_ratios", n_layers) or _ramp(self.head_ratio, self.head_start, n_layers)

    @staticmethod
    def keep_count(n: torch.Tensor, ratio: float) -> torch.Tensor:
        """``max(1, floor(n * (1 - ratio)))`` per row."""
        return torch.floor(n.double() * (1.0 - ratio)).long().clamp(min=1)

    @classmethod
    def for_memory(cls, kept: float, n_layers: int, **params: object) -> SpAtten:
        """A schedule that keeps a ``kept`` fraction of the full cache's KV, averaged over layers.

        Layer ``l`` holds the tokens that passed layer ``l - 1``: ``1 - p_{l-1}`` of them. The
        default ramp is scaled to the target (``token_ratio``); where even a ramp to ~1 cannot
        get there, every layer after ``token_start`` prunes the same ratio (``token_ratios``).
        """
        if isinstance(kept, bool) or not isinstance(kept, (int, float)) or not 0.0 < kept <= 1.0:
            raise InvalidBudgetError(f"a SpAtten budget is the fraction of KV memory kept, in (0, 1]; got {kept!r}")
        params.pop("token_ratio", None)
        params.pop("token_ratios", None)
        probe = cls(token_ratio=0.5, **params)  # type: ignore[arg-type]
        need = (1.0 - float(kept)) * n_layers  # sum over layers 0..n-2 of p_l
        shape = [r / 0.5 for r in probe.token_schedule(n_layers)][:-1]  # the ramp scales with its target
        if need <= 0:
            return cls(token_ratio=0.0, **params)  # type: ignore[arg-type]
        if sum(shape) > 0 and need / sum(shape) < 1.0:
            return cls(token_ratio=need / sum(shape), **params)  # type: ignore[arg-type]
        first = sum(1 for r in shape if r == 0.0)
        n_pruning = n_layers - 1 - first
        p = need / n_pruning if n_pruning > 0 else math.inf
        if p >= 1.0:
            smallest = (first + 1) / n_layers
            raise InvalidBudgetError(
                f"SpAtten cannot keep only {kept:.3f} of the KV memory on {n_layers} layers with token_start="
                f"{probe.token_start}: layers 0..{first} keep every token, so the smallest reachable is above "
                f"{smallest:.3f} (lower token_start to prune earlier)"
            )
        ratios = tuple([0.0] * first + [p] * (n_layers - first))
        return cls(token_ratios=ratios, **params)  # type: ignore[arg-type]

    # -- selection ---------------------------------------------------------------------------------
    @staticmethod
    def select(score: torch.Tensor, present: torch.Tensor, forced: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Keep mask ``[B, N]``: per row the ``keep`` present entries with the highest score, ``forced`` always in
        (:func:`~kvprune.policies.base.keep_top`: ranked on the grid, ties to the older token / lower head index)."""
        return keep_top(score, present, forced, keep)
