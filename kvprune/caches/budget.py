"""KV budgets: an absolute slot count or a ratio of the tokens seen, validated at construction."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..errors import InvalidBudgetError

#: the largest token budget: positions are stored as int32
MAX_TOKENS = 2**31 - 1


@dataclass(frozen=True)
class Budget:
    """Slots each (batch row, KV head) may hold: ``tokens`` (int >= 1) or ``ratio`` (float in (0, 1))."""

    tokens: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.ratio is None):
            raise InvalidBudgetError("a budget is exactly one of tokens=<int >= 1> or ratio=<float in (0, 1)>")
        if self.tokens is not None and (
            isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or not 1 <= self.tokens <= MAX_TOKENS
        ):
            raise InvalidBudgetError(f"a token budget must be an integer >= 1 and <= {MAX_TOKENS}; got {self.tokens!r}")
        if self.ratio is not None:
            r = self.ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0.0 < r < 1.0:
                raise InvalidBudgetError(
                    f"a budget ratio must be a float in (0, 1) (a fraction of the tokens seen); got {r!r}. "
                    "For an absolute budget pass an int; for no eviction use policy='full'."
                )

    @classmethod
    def parse(cls, value: int | float | Budget | None) -> Budget | None:
        """``int`` -> token budget, ``float`` -> ratio, ``Budget`` or ``None`` unchanged."""
        if value is None or isinstance(value, Budget):
            return value
        if isinstance(value, bool):
            raise InvalidBudgetError(f"a budget is an int >= 1 or a float ratio in (0, 1); got {value!r}")
        if isinstance(value, numbers.Integral):  # int, numpy and torch integers
            return cls(tokens=int(value))
        if isinstance(value, numbers.Real):
            return cls(ratio=float(value))
        raise InvalidBudgetError(
            f"a budget is an int >= 1 or a float ratio in (0, 1); got {type(value).__name__} {value!r}"
        )

    def slots(self, n_seen: torch.Tensor, floor: int) -> torch.Tensor:
        """Slots allowed per row after ``n_seen[row]`` valid tokens; never below ``floor`` (protected tokens)."""
        if self.tokens is not None:
            return torch.full_like(n_seen, max(self.tokens, floor))
        want = torch.ceil(n_seen.double() * self.ratio - 1e-9).long()  # 1e-9: 0.3 * 10 is 3, not 4
        return want.clamp(min=floor)

    def slots_for(self, n_seen: int, floor: int) -> int:
        """:meth:`slots` for rows that have all seen ``n_seen`` valid tokens, as an int (the same float arithmetic)."""
        if self.tokens is not None:
            return max(self.tokens, floor)
        return max(math.ceil(n_seen * self.ratio - 1e-9), floor)

    def check_room(self, floor: int, policy: str) -> None:
        """Raise if an absolute budget cannot hold the ``floor`` protected tokens of ``policy``."""
        if self.tokens is not None and self.tokens < floor:
            raise InvalidBudgetError(
                f"budget of {self.tokens} tokens is below the {floor} tokens policy {policy!r} protects "
                f"(sinks + recent window + newest token); use a budget >= {floor} or fewer protected tokens"
            )
