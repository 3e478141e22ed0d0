"""The policy contract: what a policy observes, how it scores slots, which tokens it protects.

A policy is pure tensor logic. It never sees a model, a mask or a cache object: the cache hands it
per-slot tensors of shape ``[batch, kv_heads, slots]`` and the attention function hands it the
observation it declared (attention probabilities already averaged over the query heads of each
KV group, float32).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..errors import InvalidParameterError

Observation = Literal["none", "last_query", "window", "all_queries"]
OBSERVATIONS: tuple[str, ...] = ("none", "last_query", "window", "all_queries")


#: significant bits kept when scores are ranked (float32 has 24): scores that agree to about one part in
#: a thousand are ties, so the last-bit noise of a batched vs. a single-row computation cannot flip a
#: decision; ties then go by position (on a tie the newest candidate is evicted first, deterministically)
RANK_BITS = 10


def rank_grid(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` as float32 rounded to :data:`RANK_BITS` significant bits (round half up on the magnitude).

    Every eviction and pruning decision ranks this, not the raw score: a batch row and the same row run
    alone then rank alike unless float noise straddles a grid step (odds ~2^-14 per near-tie).
    Two integer ops on the bits: infinities and quiet NaN come out unchanged (their low bits are zero), and
    only finite values within half a grid step of the float32 maximum (~3.4e38) round up to infinity.
    """
    drop = 24 - RANK_BITS
    bits = scores.float().view(torch.int32)
    return ((bits + (1 << (drop - 1))) & ~((1 << drop) - 1)).view(torch.float32)


def keep_top(score: torch.Tensor, present: torch.Tensor, forced: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep mask ``[B, N]``: per row the ``keep[b]`` present entries with the highest score on :func:`rank_grid`,
    ``forced`` ones always among them; on a tie the lower index (the older token) is kept.

    The one ranking rule of LazyLLM's and SpAtten's pruning (the caches' eviction applies the same rule to slots).
    """
    score = rank_grid(score).masked_fill(~present, float("-inf")).masked_fill(forced & present, float("inf"))
    order = (-score).sort(dim=-1, stable=True).indices  # descending score, stable -> lower index first
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return present & (rank < keep[:, None])


@functools.lru_cache(maxsize=32)
def _mean_weights(batch: int, m: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[batch, m, n]`` filled with ``1 / n``: the left factor of a mean over ``n`` rows as a ``bmm``; made once per
    shape (a decode step is mostly per-op overhead), and materialised (``bmm`` is slower on a stride-0 view)."""
    return torch.full((batch, m, n), 1.0 / n, dtype=dtype, device=device)


def check_int(name: str, value: object, low: int, what: str = "") -> int:
    """Validate an integer parameter ``>= low`` and return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidParameterError(f"{name} must be an integer >= {low}{what}; got {value!r}")
    return value


#: every eviction policy by (lower-case) name: filled by defining a Policy subclass with a ``name``
REGISTRY: dict[str, type] = {}
#: the methods with caches of their own (LazyLLM, SpAtten) by name: filled by :func:`register_method`
STEPWISE: dict[str, type] = {}
#: what a method's ``budget`` means: a token count or ratio of tokens seen, a fraction of KV memory, or nothing
BUDGET_KINDS: tuple[str, ...] = ("tokens", "kv_fraction", "none")


def register(cls: type) -> type:
    """Add a policy class to :data:`REGISTRY` under ``cls.name`` (a re-definition of the same class replaces it)."""
    key = str(cls.name).lower()
    if key in STEPWISE or key == "base":
        raise InvalidParameterError(f"policy name {cls.name!r} is taken by kvprune; choose another")
    old = REGISTRY.get(key)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise InvalidParameterError(
            f"policy name {cls.name!r} is already {old.__module__}.{old.__qualname__}; choose another name"
        )
    REGISTRY[key] = cls
    return cls


def register_method(cls: type) -> type:
    """Register a method configuration whose cache is not a ``PruningCache`` (it declares ``name`` and
    ``budget_kind``); its cache factory lives in ``kvprune.integrations``."""
    STEPWISE[str(cls.name).lower()] = cls
    return cls


@dataclass
class Policy:
    """Base policy: keeps ``n_sink`` first tokens and ``recent`` last tokens, scores nothing.

    ``recent`` is a token count (int) or a fraction of the current budget (float in [0, 1)).
    Subclasses override :meth:`initial_scores` and/or :meth:`update_scores` and set ``observation``.
    """

    n_sink: int = 0
    recent: int | float = 0

    name: ClassVar[str] = "base"
    observation: ClassVar[Observation] = "none"
    #: one keep-set per layer (scores averaged over all heads) instead of one per KV head
    shared_across_heads: ClassVar[bool] = False
    #: scores depend on a head's index: ``initial_scores`` then takes ``head_offset``, the global index of the
    #: first head it is given (non-zero on a tensor-parallel rank, which holds a slice of the heads)
    keyed_by_head: ClassVar[bool] = False
    #: ``update_scores`` replaces every score with the newest observation (nothing carries over), so a one-token
    #: step that does not evict (``evict_every > 1``) need not observe at all (honoured only when declared with the
    #: update rule or below it: see :meth:`rests_between_evictions`)
    replaces_scores: ClassVar[bool] = False
    #: the policy never evicts (budget is ignored)
    evicts: ClassVar[bool] = True
    #: what ``budget`` means for this method (:data:`BUDGET_KINDS`); "none" for a policy that never evicts
    budget_kind: ClassVar[str] = "tokens"
    #: the cache renders a prompt of its own and takes ``tokenizer=`` (KVzip's replay instruction)
    wants_tokenizer: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        """A subclass that sets its own ``name`` registers itself: ``make_cache(model, name, ...)`` then builds it."""
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            register(cls)

    def __post_init__(self) -> None:
        check_int("n_sink", self.n_sink, 0)
        r = self.recent
        if isinstance(r, bool) or not isinstance(r, (int, float)) or (isinstance(r, float) and not 0.0 <= r < 1.0) or r < 0:
            raise InvalidParameterError(
                f"recent must be a token count >= 0 or a fraction of the budget in [0, 1); got {r!r}"
            )

    # -- protection -------------------------------------------------------------------------
    def recent_tokens(self, budget: torch.Tensor) -> torch.Tensor:
        """Most recent tokens protected per row when the row's budget is ``budget`` slots."""
        if isinstance(self.recent, float):
            return torch.floor(budget.double() * self.recent).long()
        return torch.full_like(budget, self.recent)

    def recent_count(self, budget: int) -> int:
        """:meth:`recent_tokens` for one budget given as an int (the same rounding)."""
        return math.floor(budget * self.recent) if isinstance(self.recent, float) else self.recent

    def min_budget(self) -> int:
        """Smallest absolute budget that leaves room for the protected tokens plus the newest token."""
        if isinstance(self.recent, float):  # n_sink + floor(r * budget) <= budget
            return max(self.n_sink + 1, math.ceil(self.n_sink / (1.0 - self.recent)))
        return self.n_sink + max(self.recent, 1)

    # -- scoring ----------------------------------------------------------------------------
    @property
    def scored(self) -> bool:
        """Whether slots are ranked by a score: False for a policy that overrides none of :meth:`initial_scores`,
        :meth:`update_scores` and :meth:`eviction_scores` (every slot ties; protection alone decides, StreamingLLM)."""
        cls = type(self)
        return (cls.initial_scores is not Policy.initial_scores or cls.eviction_scores is not Policy.eviction_scores
                or self.updates)

    @property
    def rests_between_evictions(self) -> bool:
        """:attr:`replaces_scores`, when the class that says so is the one that defines the update rule
        (:meth:`update_scores` or :meth:`decay`) or a subclass of it: a subclass that overrides the rule does not
        inherit its parent's promise (a TOVA subclass that accumulates must observe every step)."""
        cls = type(self)
        rule = next(k for k in cls.__mro__ if "update_scores" in k.__dict__ or "decay" in k.__dict__)
        said = next(k for k in cls.__mro__ if "replaces_scores" in k.__dict__)
        return bool(self.replaces_scores) and issubclass(said, rule)

    @property
    def decode_decay(self) -> float | None:
        """``decay(1)`` when the decay is this policy's update rule (:meth:`update_scores` not overridden), else None:
        what a decode step may fold in directly (:meth:`fold_rows`)."""
        return self.decay(1) if type(self).update_scores is Policy.update_scores else None

    @property
    def updates(self) -> bool:
        """Whether observations change the scores (:meth:`update_scores` or :meth:`decay` overridden)."""
        cls = type(self)
        return cls.update_scores is not Policy.update_scores or cls.decay is not Policy.decay

    @property
    def window_size(self) -> int:
        """Number of trailing prefill queries observed when ``observation == "window"``."""
        return 1

    def query_weights(self, n_queries: int) -> torch.Tensor:
        """Weight of each of the ``n_queries`` new queries in an ``all_queries`` observation; the newest query's
        weight is 1 (a decode step's observation is its one row, unweighted)."""
        return torch.ones(n_queries, dtype=torch.float32)

    def initial_scores(self, keys: torch.Tensor, ranks: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Scores of newly written slots ``[B, H, q]`` from their keys and ranks (valid-token index)."""
        return torch.zeros(ranks.shape, dtype=torch.float32, device=ranks.device)

    def decay(self, n_new: int) -> float | None:
        """The update as ``scores <- decay · scores + obs`` after ``n_new`` queries (H2O 1, A2SF α^n, TOVA 0), or None
        for any other rule (then :meth:`update_scores` says it; an override of :meth:`update_scores` always wins). With
        a decay, a decode step folds its softmax rows into the scores in the op that averages them over the query
        heads (:meth:`fold_rows`)."""
        return None

    def update_scores(self, scores: torch.Tensor, obs: torch.Tensor | None, n_new: int) -> torch.Tensor:
        """New per-slot scores after a forward of ``n_new`` queries that observed ``obs``; the cache owns ``scores``,
        so a policy may update it in place and return it (one op per decode step instead of a new tensor and a copy).
        By default the :meth:`decay` rule, or unchanged scores."""
        d = self.decay(n_new)
        if d is None:
            return scores
        assert obs is not None
        if d == 0.0:
            return obs
        return scores.add_(obs) if d == 1.0 else torch.add(obs, scores, alpha=d, out=scores)

    def fold_rows(self, scores: torch.Tensor, rows: torch.Tensor, decay: float | None = None) -> None:
        """:meth:`update_scores` (with a :meth:`decay`) from a decode step's softmax rows ``[B * Hkv, G, S]``, before
        they are averaged over each KV group's query heads (over every head with ``shared_across_heads``): the mean
        and the update in one ``baddbmm`` on ``scores [B, Hkv, S]``, in place. ``decay``: ``decay(1)`` if known."""
        d = self.decay(1) if decay is None else decay
        assert d is not None
        b, hkv, s = scores.shape
        if self.shared_across_heads:  # every KV head's score is the mean of all B x Hq rows of its batch row
            n = rows.shape[0] // b * rows.shape[1]
            scores.baddbmm_(_mean_weights(b, hkv, n, rows.dtype, rows.device), rows.view(b, n, s), beta=d)
        else:
            g = rows.shape[1]
            scores.view(b * hkv, 1, s).baddbmm_(_mean_weights(b * hkv, 1, g, rows.dtype, rows.device), rows, beta=d)

    def eviction_scores(
        self, scores: torch.Tensor, keys: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor, n_valid: torch.Tensor
    ) -> torch.Tensor:
        """What eviction ranks the slots by, ``[B, H, S]`` (higher is kept): by default the score state.

        Called only when the cache evicts, with the kept ``keys [B, H, S, D]``, each slot's ``ranks``
        (valid-token index, -1 for padding), ``valid`` and the row's token count ``n_valid [B]``; for
        rules that depend on the whole cache rather than on each slot's history (a mean, an anchor).
        """
        return scores
