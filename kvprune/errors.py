"""Typed errors raised by kvprune. Each message says what was wrong and what is valid."""

from __future__ import annotations


class KVPruneError(Exception):
    """Base class of every error kvprune raises on purpose."""


class InvalidBudgetError(KVPruneError, ValueError):
    """A KV budget that is not a positive token count, a ratio in (0, 1), or below the protected tokens."""


class InvalidParameterError(KVPruneError, ValueError):
    """A policy or cache parameter outside its valid range."""


class UnknownPolicyError(KVPruneError, ValueError):
    """A policy name that is not registered."""


class UnsupportedArchitectureError(KVPruneError, NotImplementedError):
    """A model family kvprune does not know how to drive."""


class UnsupportedGenerationModeError(KVPruneError, NotImplementedError):
    """A generate mode (assisted decoding, torch.compile, ...) a pruning cache cannot serve correctly."""


class BatchMismatchError(KVPruneError, ValueError):
    """Inputs whose batch size differs from the batch the cache holds."""


class CacheUsageError(KVPruneError, RuntimeError):
    """A cache used with a model that was not prepared for it (its attention never reached kvprune)."""
