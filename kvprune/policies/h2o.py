"""H2O (arXiv 2306.14048): heavy hitters by accumulated attention plus a recent window.

Score ``A_n[k] = A_{n-1}[k] + S_n[k]`` (A2SF with α = 1); by default half the budget is the recent
window and half the heavy hitters, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Policy


@dataclass
class H2O(Policy):
    """Keep the recent window and the tokens with the largest accumulated attention."""

    recent: int | float = 0.5

    name = "h2o"
    observation = "all_queries"

    def decay(self, n_new: int) -> float:
        return 1.0
