"""``make_cache``: the one entry point that validates a method's arguments, prepares the model and builds its cache."""

from __future__ import annotations

from typing import Any

import torch

from ..caches import Budget, PruningCache
from ..caches.lazy import LazyCache
from ..caches.spatten import SpAttenCache
from ..distributed import attach, tensor_parallel_of
from ..policies import Policy, method_config
from . import kvzip, lazyllm, spatten  # noqa: F401 - each registers its method's cache factory
from .factories import builds, factory_for
from .prepare import SUPPORTED_MODEL_TYPES, check_architecture, check_backend, prepare_model
from .quantized import check_kv_bits, make_quantized_cache

__all__ = ["SUPPORTED_MODEL_TYPES", "check_architecture", "make_cache", "make_pruning_cache", "prepare_model"]


@builds(Policy)
def make_pruning_cache(model: torch.nn.Module, policy: str | Policy, budget: int | float | Budget | None = None, *,
                       backend: str | None = None, prefill_only: bool = False, evict_every: int = 1,
                       kv_bits: int | tuple[int, int] | None = None, **policy_params: Any) -> PruningCache:
    """Every eviction policy's cache: a :class:`PruningCache`, or its quantized variant with ``kv_bits``."""
    check_architecture(model.config)
    bits = check_kv_bits(kv_bits, str(getattr(policy, "name", policy)))
    if bits is not None:
        cache = make_quantized_cache(model, policy, budget, bits, prefill_only=prefill_only, evict_every=evict_every,
                                     **policy_params)
    else:
        cache = PruningCache(policy, budget, config=model.config, prefill_only=prefill_only, evict_every=evict_every,
                             **policy_params)
    prepare_model(model, backend)
    return cache


def make_cache(
    model: torch.nn.Module,
    policy: str | Policy = "a2sf",
    budget: int | float | Budget | None = None,
    *,
    backend: str | None = None,
    prefill_only: bool = False,
    evict_every: int = 1,
    kv_bits: int | tuple[int, int] | None = None,
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
    ``kv_bits=8`` or ``4`` (or a ``(key_bits, value_bits)`` pair) stores keys and values quantized per vector
    (:class:`~kvprune.caches.quantized.QuantizedPruningCache`); not for LazyLLM or SpAtten (its own ``quant_bits``).

    A model sharded with ``from_pretrained(..., tp_plan="auto")`` under ``torchrun`` is recognised: each
    rank's cache stores its own KV heads, and decisions that combine heads reduce their scores across the
    group so that every rank takes the single-process decision (README, "Scaling out").
    """
    check_architecture(model.config)
    parallel = tensor_parallel_of(model)  # a model sharded with tp_plan: its group (typed error if heads don't split)
    config = method_config(policy)  # the registry: a typed error for an unknown name
    policy = policy.lower() if isinstance(policy, str) else policy
    if backend is not None:
        check_backend(backend)
    factory = factory_for(config)  # the method's own cache, or a PruningCache for every eviction policy
    cache = factory(model, policy, budget, backend=backend, prefill_only=prefill_only, evict_every=evict_every,
                    kv_bits=kv_bits, **policy_params)
    return attach(cache, parallel)
