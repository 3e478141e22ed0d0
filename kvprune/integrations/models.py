"""``make_cache``: the one entry point that validates a method's arguments, prepares the model and builds its cache."""

from __future__ import annotations

from typing import Any

import torch

from ..caches import Budget, PruningCache
from ..caches.lazy import LazyCache
from ..caches.spatten import SpAttenCache
from ..errors import InvalidParameterError, UnknownPolicyError
from ..policies import Policy, check_params, methods
from ..policies.lazyllm import LazyLLM
from ..policies.spatten import SpAtten
from .lazyllm import make_lazy_cache
from .prepare import SUPPORTED_MODEL_TYPES, check_architecture, check_backend, prepare_model
from .spatten import make_spatten_cache

__all__ = ["SUPPORTED_MODEL_TYPES", "check_architecture", "make_cache", "prepare_model"]


def make_cache(
    model: torch.nn.Module,
    policy: str | Policy = "a2sf",
    budget: int | float | Budget | None = None,
    *,
    backend: str | None = None,
    prefill_only: bool = False,
    evict_every: int = 1,
    **policy_params: Any,
) -> PruningCache | LazyCache | SpAttenCache:
    """Prepare ``model`` and return a fresh cache for one ``generate`` conversation.

    ``policy="lazyllm"`` (or a :class:`~kvprune.policies.lazyllm.LazyLLM`) returns a
    :class:`~kvprune.caches.lazy.LazyCache` (no budget: LazyLLM saves compute, not memory);
    ``policy="spatten"`` (or a :class:`~kvprune.policies.spatten.SpAtten`) returns a
    :class:`~kvprune.caches.spatten.SpAttenCache`; its optional ``budget`` is the fraction of KV
    memory kept (averaged over layers), which sets the token pruning ratio.
    Every other policy returns a :class:`PruningCache`; ``prefill_only=True`` compresses the prompt to
    the budget once and then lets the cache grow without scoring or evicting (the SnapKV / kvpress
    schedule: decode steps cost what a plain cache's do); ``evict_every=k`` evicts a block every ``k``
    decode steps instead of one token per step (at most ``budget + k - 1`` slots per row and head).
    """
    check_architecture(model.config)
    if isinstance(policy, str):
        if policy.lower() not in methods():
            raise UnknownPolicyError(f"unknown method {policy!r}; valid names (any case): {', '.join(methods())}")
        policy = policy.lower()
    if backend is not None:
        check_backend(backend)
    if policy in ("lazyllm", "spatten"):
        check_params(policy, policy_params)  # unknown names are typed errors, not TypeErrors from a dataclass

    stepwise = isinstance(policy, (LazyLLM, SpAtten)) or policy in ("lazyllm", "spatten")
    if stepwise and (prefill_only or evict_every != 1):
        raise InvalidParameterError("prefill_only and evict_every apply to the eviction policies, not to LazyLLM or SpAtten")
    if isinstance(policy, SpAtten) or policy == "spatten":
        return make_spatten_cache(model, policy if isinstance(policy, SpAtten) else None, budget, backend=backend, **policy_params)

    if isinstance(policy, LazyLLM) or policy == "lazyllm":
        if budget is not None:
            raise InvalidParameterError("LazyLLM prunes computation, not memory: it takes no budget (pass budget=None)")
        return make_lazy_cache(model, policy if isinstance(policy, LazyLLM) else None, **policy_params)
    cache = PruningCache(policy, budget, config=model.config, prefill_only=prefill_only, evict_every=evict_every,
                         **policy_params)
    prepare_model(model, backend)
    return cache
