"""The transformers-facing pruning cache and its per-layer storage."""

from .budget import Budget
from .cache import ATTN_PREFIX, CacheStats, PruningCache
from .layer import PruningLayer

__all__ = ["ATTN_PREFIX", "Budget", "CacheStats", "PruningCache", "PruningLayer"]
