"""Which cache each method builds: one table from a method's configuration class to its cache factory.

``kvprune.policies`` says what a method is (its name, any case, to its configuration class; what its budget
means); this table says which cache it builds. A factory registers itself where it is defined
(``@builds(LazyLLM)``); the eviction policies' factory is registered for :class:`~kvprune.policies.Policy`,
so a new policy needs none (a subclass with a cache of its own, like KVzip, registers one). Every factory
takes the same options and refuses, with a typed error and before the model changes, those it does not support.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import InvalidParameterError

#: ``(model, policy, budget, *, backend, prefill_only, evict_every, kv_bits, **params) -> cache``
Factory = Callable[..., Any]
#: the cache factory of each configuration class (the nearest registered base class answers for a subclass)
FACTORIES: dict[type, Factory] = {}


def builds(config: type) -> Callable[[Factory], Factory]:
    """Register the decorated function as the cache factory of ``config`` (and of its subclasses)."""

    def register(factory: Factory) -> Factory:
        FACTORIES[config] = factory
        return factory

    return register


def factory_for(config: type) -> Factory:
    """The factory of ``config``: its own, or its nearest registered base class's."""
    for cls in config.__mro__:
        if cls in FACTORIES:
            return FACTORIES[cls]
    raise InvalidParameterError(f"{config.__name__} has no cache factory; register one with @builds({config.__name__})")


def refuse_schedule(method: str, prefill_only: bool, evict_every: int) -> None:
    """Methods that do not evict a token budget (LazyLLM, SpAtten) take no eviction schedule."""
    if prefill_only or evict_every != 1:
        raise InvalidParameterError(
            f"prefill_only and evict_every apply to the eviction policies, not to LazyLLM or SpAtten ({method} prunes "
            "with its own schedule)"
        )
