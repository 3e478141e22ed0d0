"""Random eviction: the floor every policy must beat.

Each token gets a pseudo-random score hashed from (seed, layer, KV head, its index among the row's
valid tokens), so results are deterministic and a row's choices do not depend on its batch. The KV head
is its global index, so a tensor-parallel rank (which holds a slice of the heads) draws what one process does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, check_int

_MASK = (1 << 31) - 1


def hash_uniform(*keys: torch.Tensor | int) -> torch.Tensor:
    """A uniform float32 in [0, 1) per element from integer keys (a small multiply-xorshift mix)."""
    x = torch.zeros((), dtype=torch.int64)
    for i, k in enumerate(keys):
        x = (x * 1_000_003 + (k if isinstance(k, int) else k.long()) + 97 * (i + 1)) & _MASK
        for _ in range(2):
            x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK
            x = ((x ^ (x >> 12)) * 0x297A2D39) & _MASK
            x = x ^ (x >> 15)
    return x.to(torch.float32) / float(_MASK + 1)


@dataclass
class RandomPolicy(Policy):
    """Keep a uniformly random subset of tokens."""

    seed: int = 0

    name = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("seed", self.seed, 0)

    keyed_by_head = True  # a head's hash uses its global index: a tensor-parallel rank draws what one process does

    def initial_scores(self, keys: torch.Tensor, ranks: torch.Tensor, layer_idx: int, head_offset: int = 0) -> torch.Tensor:
        heads = torch.arange(head_offset, head_offset + ranks.shape[1], device=ranks.device).view(1, -1, 1)
        return hash_uniform(self.seed, layer_idx, heads, ranks)
