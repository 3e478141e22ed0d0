"""StreamingLLM (arXiv 2309.17453): attention sinks plus a recent window.

Keeps the first ``n_sink`` tokens and the most recent ones; the score is the token's index among
the row's valid tokens, so the oldest non-sink token goes first. Positions are not shifted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy


@dataclass
class StreamingLLM(Policy):
    """Keep ``n_sink`` sink tokens and fill the rest of the budget with the newest tokens."""

    n_sink: int = 4

    name = "streaming"

    def eviction_scores(
        self, scores: torch.Tensor, keys: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor, n_valid: torch.Tensor
    ) -> torch.Tensor:
        # read from the ranks when evicting, not stored per slot: nothing to write or move at each step
        return ranks.to(torch.float32)
