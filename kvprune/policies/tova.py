"""TOVA (arXiv 2401.06104): keep the tokens the current query attends to most.

One keep-set per layer: the score is the newest query's attention averaged over all heads, and it
replaces the previous score at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Policy


@dataclass
class TOVA(Policy):
    """Evict the token with the lowest head-averaged attention from the newest query."""

    name = "tova"
    observation = "last_query"
    shared_across_heads = True
    replaces_scores = True

    def decay(self, n_new: int) -> float:
        return 0.0  # the newest observation replaces the score
