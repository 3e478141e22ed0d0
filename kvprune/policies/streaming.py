"""StreamingLLM (arXiv 2309.17453): attention sinks plus a recent window.

Keeps the first ``n_sink`` tokens and the ``budget - n_sink`` most recent ones (counted among the row's
real tokens): the oldest non-sink token goes first. Nothing is scored. Positions are not shifted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidParameterError
from .base import Policy


@dataclass
class StreamingLLM(Policy):
    """Keep ``n_sink`` sink tokens and fill the rest of the budget with the newest tokens."""

    n_sink: int = 4

    name = "streaming"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recent != 0:
            raise InvalidParameterError(
                "streaming keeps its n_sink sinks and the newest (budget - n_sink) tokens, so `recent` does not "
                f"apply to it; leave it 0 (got {self.recent!r})"
            )

    # the rolling window is protection, not a score: ranking by age would tie old tokens on the ranking grid
    # (10 significant bits) once ranks pass 1024, and ties go to the newest
    def recent_tokens(self, budget: torch.Tensor) -> torch.Tensor:
        return budget - self.n_sink

    def recent_count(self, budget: int) -> int:
        return budget - self.n_sink
