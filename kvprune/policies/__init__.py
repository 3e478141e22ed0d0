"""Eviction policies: pure tensor logic, one small module each, buildable by name."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import InvalidParameterError, UnknownPolicyError
from .a2sf import A2SF
from .base import OBSERVATIONS, REGISTRY, RESERVED, Observation, Policy
from .full import FullCache
from .h2o import H2O
from .keydiff import KeyDiff
from .knorm import KNorm
from .observed import ObservedAttention
from .random import RandomPolicy
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .tova import TOVA

#: the eviction policies by name: every ``Policy`` subclass with a ``name`` registers itself when defined
#: (the built-in ones above; a user's own policy the same way, see the README's "Writing a policy")
POLICIES: dict[str, type[Policy]] = REGISTRY


def methods() -> tuple[str, ...]:
    """Every method ``kvprune.make_cache`` accepts by name now: the registered policies, LazyLLM and SpAtten."""
    return tuple(sorted({*POLICIES, *RESERVED}))


#: the built-in methods (``methods()`` also lists policies registered later)
METHODS: tuple[str, ...] = methods()


def build_policy(policy: str | Policy, **params: Any) -> Policy:
    """Return ``policy`` itself, or a new policy built from its registered name and parameters."""
    if isinstance(policy, Policy):
        if params:
            raise InvalidParameterError("pass parameters either to the policy object or by name, not both")
        return policy
    if isinstance(policy, str) and policy.lower() in RESERVED:
        raise UnknownPolicyError(
            f"{policy!r} is not an eviction policy of PruningCache; build its own cache with "
            f"kvprune.make_cache(model, {policy.lower()!r}) (eviction policies: {', '.join(sorted(POLICIES))})"
        )
    if not isinstance(policy, str) or policy.lower() not in POLICIES:
        raise UnknownPolicyError(f"unknown policy {policy!r}; valid names: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[policy.lower()]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise InvalidParameterError(
            f"policy {cls.name!r} has no parameter(s) {unknown}; valid parameters: {sorted(fields)}"
        )
    return cls(**params)


def check_params(method: str, params: dict[str, Any]) -> None:
    """Refuse parameters that ``method`` (any registered name, LazyLLM and SpAtten included) does not take,
    and values its configuration rejects, before anything runs: a typed error naming the valid ones."""
    from .lazyllm import LazyLLM
    from .spatten import SpAtten

    name = method.lower() if isinstance(method, str) else method
    if name in RESERVED:
        cls = LazyLLM if name == "lazyllm" else SpAtten
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - fields)
        if unknown:
            raise InvalidParameterError(f"{name} has no parameter(s) {unknown}; valid parameters: {sorted(fields)}")
        cls(**params)
    else:
        build_policy(name, **params)


__all__ = [
    "A2SF",
    "H2O",
    "KNorm",
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
    "build_policy",
    "check_params",
    "methods",
]
