"""The transformers-facing pruning cache and its per-layer storage."""

from .budget import Budget
from .base import CacheStats, KVCache, KVLayer
from .cache import ATTN_PREFIX, PruningCache
from .layer import PruningLayer

__all__ = ["ATTN_PREFIX", "Budget", "CacheStats", "KVCache", "KVLayer", "PruningCache", "PruningLayer"]
