"""A2SF (arXiv 2407.20485): accumulative attention with a forgetting factor.

Eq. 3 of the paper, per layer and KV head: ``A_n[k] = α·A_{n-1}[k] + S_n[k]`` with ``S_n`` the
softmax row of query step n. Over a prompt of q queries the same recursion is the weighted column
sum ``Σ_j α^{q-1-j}·S_j[k]``, which the attention function computes in query blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InvalidParameterError
from .base import Policy


@dataclass
class A2SF(Policy):
    """Keep the tokens with the largest forgetting-factor accumulated attention (α = 1 is H2O's sum).

    Defaults from a sweep on SmolLM2-135M-Instruct (BENCHMARKS.md §8): α = 0.1 (the low end of the paper's
    0.1–0.3) with a recent window of half the budget (as the authors' code pairs the factor with one, and as
    H2O's default) had the lowest continuation NLL increase at a quarter of the cache; the best values depend
    on model and task, so sweep them (``compare(..., policy_params={"a2sf": {"alpha": a, "recent": r}})``).
    """

    alpha: float = 0.1
    recent: int | float = 0.5

    name = "a2sf"
    observation = "all_queries"

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not 0.0 < a <= 1.0:
            raise InvalidParameterError(f"alpha (the forgetting factor) must be in (0, 1]; got {a!r}")
        self.alpha = float(a)

    def query_weights(self, n_queries: int) -> torch.Tensor:
        ages = torch.arange(n_queries - 1, -1, -1, dtype=torch.float64)
        return (self.alpha**ages).to(torch.float32)

    def decay(self, n_new: int) -> float:
        return self.alpha**n_new  # α^n·A + S
