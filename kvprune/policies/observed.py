"""Observed attention: the mean attention each token received (kvpress's ObservedAttentionPress).

H2O's accumulated sum ``A_n[k] = Σ_{j ≤ n} S_j[k]`` divided by the number of queries that could see
token ``k`` (``n - rank(k)``), so old tokens do not win merely by having been attended more often
(the causal bias A2SF's forgetting factor also removes). No recent window by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .h2o import H2O


@dataclass
class ObservedAttention(H2O):
    """Keep the tokens with the largest mean attention received over the queries that saw them."""

    recent: int | float = 0

    name = "observed"

    def eviction_scores(
        self, scores: torch.Tensor, keys: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor, n_valid: torch.Tensor
    ) -> torch.Tensor:
        seen_by = (n_valid[:, None, None] - ranks.long()).clamp(min=1)
        return scores / seen_by
