"""The full cache: never evicts. The reference every other policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Policy


@dataclass
class FullCache(Policy):
    """Keep every token (the budget is ignored)."""

    name = "full"
    evicts = False
    budget_kind = "none"
