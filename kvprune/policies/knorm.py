"""K-norm (arXiv 2406.11430): keep the keys with the smallest L2 norm.

Low-norm keys tend to draw high attention, so the norm is a free, attention-less importance proxy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy


@dataclass
class KNorm(Policy):
    """Score each slot by ``-‖k‖₂``, fixed when the token is written."""

    name = "knorm"

    def initial_scores(self, keys: torch.Tensor, ranks: torch.Tensor, layer_idx: int) -> torch.Tensor:
        return -keys.float().norm(dim=-1)
