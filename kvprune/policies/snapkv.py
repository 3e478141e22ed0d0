"""SnapKV (arXiv 2404.14469): vote by the observation window, cluster by pooling.

At prefill the score of a prefix token is the attention it receives from the last ``window``
queries (summed), max-pooled over ``kernel_size`` neighbouring tokens (in position order, padding
skipped); the window itself is kept. At a
decode step the window is the current query (w = 1), so the cache stays within its budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidParameterError
from .base import Policy, check_int


@dataclass
class SnapKV(Policy):
    """Keep the observation window and the prefix tokens with the largest pooled window attention."""

    window: int = 32
    kernel_size: int = 5
    pooling: str = "max"
    recent: int | float = -1  # -1: protect the observation window

    name = "snapkv"
    observation = "window"

    def __post_init__(self) -> None:
        check_int("window", self.window, 1)
        check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise InvalidParameterError(f"kernel_size must be odd so pooling keeps positions; got {self.kernel_size}")
        if self.pooling not in ("max", "avg"):
            raise InvalidParameterError(f"pooling must be 'max' or 'avg'; got {self.pooling!r}")
        if self.recent == -1:
            self.recent = self.window
        super().__post_init__()

    @property
    def window_size(self) -> int:
        return self.window

    def update_scores(self, scores: torch.Tensor, obs: torch.Tensor | None, n_new: int) -> torch.Tensor:
        assert obs is not None
        return obs  # the window's votes; pooled over neighbours when the cache evicts

    def eviction_scores(
        self, scores: torch.Tensor, keys: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor, n_valid: torch.Tensor
    ) -> torch.Tensor:
        """Votes pooled over each row's valid tokens in position order: padding and free slots between
        them are no one's neighbours, so a row pools alike alone and in a batch."""
        if self.kernel_size == 1:
            return scores
        b, h, s = scores.shape
        key = torch.where(valid, ranks.long(), torch.iinfo(torch.int64).max)
        order = key.argsort(dim=-1, stable=True)  # valid slots first, by rank (= position order)
        packed = scores.gather(-1, order).masked_fill(~valid.gather(-1, order), 0.0)
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(packed.reshape(b * h, 1, s), self.kernel_size, stride=1, padding=self.kernel_size // 2)
        return torch.empty_like(scores).scatter_(-1, order, pooled.reshape(b, h, s))
