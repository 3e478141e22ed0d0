"""Eviction policies: pure tensor logic, one small module each, buildable by name."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import InvalidParameterError, UnknownPolicyError
from .a2sf import A2SF
from .base import OBSERVATIONS, REGISTRY, STEPWISE, Observation, Policy
from .full import FullCache
from .h2o import H2O
from .keydiff import KeyDiff
from .knorm import KNorm
from .kvzip import KVzip
from .lazyllm import LazyLLM  # noqa: F401 - registers the method
from .observed import ObservedAttention
from .random import RandomPolicy
from .snapkv import SnapKV
from .spatten import SpAtten  # noqa: F401 - registers the method
from .streaming import StreamingLLM
from .tova import TOVA

#: the eviction policies by name: every ``Policy`` subclass with a ``name`` registers itself when defined
#: (the built-in ones above; a user's own policy the same way, see the README's "Writing a policy")
POLICIES: dict[str, type[Policy]] = REGISTRY


def methods() -> tuple[str, ...]:
    """Every method ``kvprune.make_cache`` accepts by name now: the registered policies, LazyLLM and SpAtten."""
    return tuple(sorted({*POLICIES, *STEPWISE}))


#: the built-in methods (``methods()`` also lists policies registered later)
METHODS: tuple[str, ...] = methods()


def method_config(method: str | object) -> type:
    """The configuration class of a method given by name (any case) or as a configuration object: the one
    lookup every caller dispatches through (cache factory, budget kind, parameters)."""
    if isinstance(method, str):
        cls = POLICIES.get(method.lower()) or STEPWISE.get(method.lower())
        if cls is None:
            raise UnknownPolicyError(f"unknown method {method!r}; valid names (any case): {', '.join(methods())}")
        return cls
    if type(method) in STEPWISE.values() or isinstance(method, Policy):
        return type(method)
    raise UnknownPolicyError(f"unknown method {method!r}; give a name ({', '.join(methods())}) or a configuration object")


def budget_kind(method: str | object) -> str:
    """What a budget means for ``method``: ``"tokens"`` (an int, or a ratio of tokens seen), ``"kv_fraction"``
    (SpAtten: the fraction of KV memory kept) or ``"none"`` (full, LazyLLM: no budget)."""
    return method_config(method).budget_kind


def wants_tokenizer(method: str | object) -> bool:
    """Whether ``method``'s cache renders a prompt of its own and takes ``tokenizer=`` (KVzip's replay instruction)."""
    return method_config(method).wants_tokenizer


def configure(cls: type, method: str | object, params: dict[str, Any]) -> Any:
    """The configuration a cache factory builds from: ``method`` itself when it is a ``cls`` object (then no
    parameters by name), else ``cls(**params)`` with unknown names refused (typed errors)."""
    if isinstance(method, cls):
        if params:
            raise InvalidParameterError(f"pass parameters either to the {cls.__name__} object or by name, not both")
        return method
    return build_config(cls, params)


def build_policy(policy: str | Policy, **params: Any) -> Policy:
    """Return ``policy`` itself, or a new policy built from its registered name and parameters."""
    if isinstance(policy, Policy):
        if params:
            raise InvalidParameterError("pass parameters either to the policy object or by name, not both")
        return policy
    if isinstance(policy, str) and policy.lower() in STEPWISE:
        raise UnknownPolicyError(
            f"{policy!r} is not an eviction policy of PruningCache; build its own cache with "
            f"kvprune.make_cache(model, {policy.lower()!r}) (eviction policies: {', '.join(sorted(POLICIES))})"
        )
    if not isinstance(policy, str) or policy.lower() not in POLICIES:
        raise UnknownPolicyError(f"unknown policy {policy!r}; valid names: {', '.join(sorted(POLICIES))}")
    return build_config(POLICIES[policy.lower()], params)


def build_config(cls: type, params: dict[str, Any]) -> Any:
    """``cls(**params)`` after refusing parameter names ``cls`` does not take (a typed error naming the valid ones)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        what = f"policy {cls.name!r}" if issubclass(cls, Policy) else cls.name
        raise InvalidParameterError(f"{what} has no parameter(s) {unknown}; valid parameters: {sorted(fields)}")
    return cls(**params)


def check_params(method: str, params: dict[str, Any]) -> None:
    """Refuse parameters that ``method`` (any registered name) does not take, and values its configuration
    rejects, before anything runs."""
    build_config(method_config(method), params)


__all__ = [
    "A2SF",
    "H2O",
    "KNorm",
    "KVzip",
    "KeyDiff",
    "METHODS",
    "OBSERVATIONS",
    "ObservedAttention",
    "POLICIES",
    "FullCache",
    "Observation",
    "Policy",
    "RandomPolicy",
    "SnapKV",
    "StreamingLLM",
    "TOVA",
    "budget_kind",
    "build_config",
    "build_policy",
    "check_params",
    "configure",
    "method_config",
    "methods",
    "wants_tokenizer",
]
