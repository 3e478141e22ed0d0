"""kvprune: KV-cache eviction for Hugging Face transformers, as one cache you pass to ``generate``."""

from .caches import Budget, CacheStats, PruningCache
from .caches.lazy import LazyCache
from .caches.quantized import QuantizedPruningCache
from .caches.spatten import SpAttenCache
from .errors import (
    BatchMismatchError,
    CacheUsageError,
    InvalidBudgetError,
    InvalidParameterError,
    KVPruneError,
    UnknownPolicyError,
    UnsupportedArchitectureError,
    UnsupportedGenerationModeError,
)
from .integrations import SUPPORTED_MODEL_TYPES, make_cache, prepare_model
from .policies import (
    A2SF,
    H2O,
    METHODS,
    POLICIES,
    TOVA,
    FullCache,
    KeyDiff,
    KNorm,
    ObservedAttention,
    Policy,
    RandomPolicy,
    SnapKV,
    StreamingLLM,
    build_policy,
)
from .policies.lazyllm import LazyLLM
from .policies.spatten import SpAtten

__version__ = "0.1.0"

__all__ = [
    "A2SF",
    "H2O",
    "POLICIES",
    "SUPPORTED_MODEL_TYPES",
    "TOVA",
    "BatchMismatchError",
    "Budget",
    "CacheStats",
    "CacheUsageError",
    "FullCache",
    "InvalidBudgetError",
    "InvalidParameterError",
    "KNorm",
    "KeyDiff",
    "LazyCache",
    "LazyLLM",
    "KVPruneError",
    "METHODS",
    "ObservedAttention",
    "Policy",
    "PruningCache",
    "QuantizedPruningCache",
    "RandomPolicy",
    "SnapKV",
    "SpAtten",
    "SpAttenCache",
    "StreamingLLM",
    "UnknownPolicyError",
    "UnsupportedArchitectureError",
    "UnsupportedGenerationModeError",
    "build_policy",
    "make_cache",
    "prepare_model",
]
