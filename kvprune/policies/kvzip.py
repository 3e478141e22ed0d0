"""KVzip (arXiv 2505.23416): query-agnostic scores from reconstructing the context.

After the context ``c`` is prefilled, the model is asked to repeat it ("Repeat the previous context
exactly.") and is teacher-forced with ``c`` itself, in chunks ``c_1..c_T`` of ``chunk_size`` tokens
(Algorithm 1; chunk t > 1 quotes the last ``carry_over`` tokens of chunk t - 1 in its prompt). In layer
``l``, the replay's queries ``Q`` (``G`` query heads per KV head, ``n_in`` tokens) attend to the sub-sampled
keys ``K̄`` -- the cached pairs of chunk ``c_t`` (and the ``n_sink`` first tokens), then the replay's own
keys, causally -- and a cached pair's importance is the largest attention it receives (Section 3, Eq. 2 with
Algorithm 1's sub-sampling)::

    A = Softmax(Q K̄ᵀ / sqrt(d))               # [G, H, n_in, m + n_in]
    S[l, h, j] = max_{g, i} A[g, h, i, j]     # j in chunk c_t

The pairs with the lowest ``S`` are evicted: to one budget shared by every head and layer of a row
(``scope="global"``, the default: the paper's non-uniform allocation and kvpress's default; the budget is then
the mean per (layer, KV head)), or to the same budget in every (row, KV head) (``scope="head"``, the uniform
allocation). On SmolLM2-135M at 2K tokens the uniform one drops digits of the needles the global one keeps
(BENCHMARKS.md §11). The ``n_sink`` first tokens are never evicted; the replay's own keys and
values are discarded. The replay is driven by :mod:`kvprune.integrations.kvzip` (it needs the model and
the tokenizer's chat template); this class holds the parameters and the score rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import CacheUsageError, InvalidParameterError
from .base import Policy, check_int

#: the two budget allocations: one budget per (row, KV head), or one per row across heads and layers
SCOPES: tuple[str, ...] = ("head", "global")


@dataclass
class KVzip(Policy):
    """Keep the pairs the model attends to most while it repeats the context (max over queries and group)."""

    n_sink: int = 4
    chunk_size: int = 2048
    scope: str = "global"
    #: the instruction before the first chunk, and before the quoted tail of the previous chunk for the rest
    prompt: str = "Repeat the previous context exactly."
    continuation: str = "Repeat the part of the previous context exactly, starting with"
    carry_over: int = 8

    name = "kvzip"
    #: the forward's own queries are not observed: the scores come from the replay
    observation = "none"
    #: the replay renders its instruction through a tokenizer (``make_cache(..., tokenizer=tok)``)
    wants_tokenizer: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_int("chunk_size", self.chunk_size, 1)
        check_int("carry_over", self.carry_over, 0)
        if self.scope not in SCOPES:
            raise InvalidParameterError(f"scope must be one of {SCOPES} ('head': the same budget in every KV head; "
                                        f"'global': one budget across heads and layers); got {self.scope!r}")
        for what in ("prompt", "continuation"):
            if not isinstance(getattr(self, what), str):
                raise InvalidParameterError(f"{what} must be a string; got {getattr(self, what)!r}")
        if self.recent != 0:
            raise InvalidParameterError(f"kvzip protects no recent window (its scores cover every context token); "
                                        f"got recent={self.recent!r}")
        super().__post_init__()

    @staticmethod
    def reduce(probs: torch.Tensor, query_valid: torch.Tensor) -> torch.Tensor:
        """``S[b, h, j] = max_{g, i} A[b, h, g, i, j]`` over the real replay queries: ``[B, Hkv, G, q, S]`` -> ``[B, Hkv, S]``."""
        real = query_valid.to(torch.bool)[:, None, None, :, None]
        return probs.float().masked_fill(~real, 0.0).amax(dim=(2, 3))

    def update_scores(self, scores: torch.Tensor, obs: torch.Tensor | None, n_new: int) -> torch.Tensor:
        """Never called by the KVzip cache (it folds the replay's maxima itself): reached only when a plain
        ``PruningCache`` runs this policy, which cannot replay."""
        raise CacheUsageError(
            "kvzip scores a context by replaying it through the model; a plain PruningCache cannot do that. "
            "Build its cache with kvprune.make_cache(model, 'kvzip', budget, tokenizer=tokenizer)"
        )
