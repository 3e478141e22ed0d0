"""``make_cache``: the one entry point that validates a method's arguments, prepares the model and builds its cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..caches import Budget, PruningCache
from ..caches.lazy import LazyCache
from ..caches.spatten import SpAttenCache
from ..distributed import attach, tensor_parallel_of
from ..errors import InvalidParameterError
from ..policies import Policy, method_config
from ..policies.lazyllm import LazyLLM
from ..policies.kvzip import KVzip
from ..policies.spatten import SpAtten
from .kvzip import make_kvzip_cache
from .lazyllm import make_lazy_cache
from .prepare import SUPPORTED_MODEL_TYPES, check_architecture, check_backend, prepare_model
from .quantized import check_kv_bits, make_quantized_cache
from .spatten import make_spatten_cache

__all__ = ["STEPWISE_FACTORIES", "SUPPORTED_MODEL_TYPES", "check_architecture", "make_cache", "prepare_model"]

#: the cache factory of each method that is not a ``PruningCache`` policy, by its registered configuration class
#: (``kvprune.policies.base.STEPWISE``); every eviction policy builds a ``PruningCache``
STEPWISE_FACTORIES: dict[type, Callable[..., Any]] = {LazyLLM: make_lazy_cache, SpAtten: make_spatten_cache}


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
    factory = STEPWISE_FACTORIES.get(config)
    bits = check_kv_bits(kv_bits, factory is not None, str(getattr(config, "name", config)))  # before the model changes
    if factory is not None:
        if prefill_only or evict_every != 1:
            raise InvalidParameterError("prefill_only and evict_every apply to the eviction policies, not to LazyLLM or SpAtten")
        return attach(factory(model, policy, budget, backend=backend, **policy_params), parallel)
    if config is KVzip:  # an eviction policy whose cache replays the context first (it may take tokenizer=)
        if bits is not None:
            raise InvalidParameterError("kvzip does not combine with kv_bits yet; drop kv_bits or pick another policy")
        return attach(make_kvzip_cache(model, policy, budget, backend=backend, prefill_only=prefill_only,
                                       evict_every=evict_every, tensor_parallel=parallel.active,
                                       **policy_params), parallel)
    if bits is not None:
        cache = make_quantized_cache(model, policy, budget, bits, prefill_only=prefill_only, evict_every=evict_every,
                                     **policy_params)
    else:
        cache = PruningCache(policy, budget, config=model.config, prefill_only=prefill_only, evict_every=evict_every,
                             **policy_params)
    prepare_model(model, backend)
    return attach(cache, parallel)
