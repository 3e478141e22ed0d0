"""KeyDiff (arXiv 2504.15364): keep the keys least similar to the cache's mean key direction.

Score ``-cos(k_i, a)`` with the anchor ``a`` the mean of the unit-normalised keys held by the
(row, KV head): distinctive keys tend to carry information the rest of the cache does not, and the
rule needs no attention weights at all. The anchor is recomputed over the kept keys at each eviction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Policy


@dataclass
class KeyDiff(Policy):
    """Keep the keys with the lowest cosine similarity to the mean normalised key."""

    name = "keydiff"

    def eviction_scores(
        self, scores: torch.Tensor, keys: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor, n_valid: torch.Tensor
    ) -> torch.Tensor:
        unit = F.normalize(keys.float(), dim=-1)
        w = valid.unsqueeze(-1).to(unit.dtype)
        anchor = (unit * w).sum(-2, keepdim=True) / w.sum(-2, keepdim=True).clamp(min=1.0)
        return -F.cosine_similarity(unit, anchor, dim=-1)
