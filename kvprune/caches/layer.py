"""One layer of a pruning cache: its policy's scores, masks and evictions over its slots (:mod:`.slots`).

The attention function drives it (:mod:`.contract`): new tokens are appended, their padding and initial
scores recorded, the observation folded into the scores, and the layer evicted down to its budget, a few
slots at a decode step together with the other layers (:mod:`.decode`), or by compacting the kept slots.
"""

from __future__ import annotations

import torch

from ..distributed import parallel_of
from ..errors import BatchMismatchError, CacheUsageError, UnsupportedGenerationModeError
from ..policies import Policy
from ..policies.base import rank_grid
from .base import check_layout, room
from .budget import Budget
from .contract import bind
from .decode import DeferredEvictions, evict_over
from .slots import INDEX_DTYPE, SlotLayer

#: a decode eviction of at most this many slots per (row, head) (``evict_every`` up to it, a short chunk) takes the
#: few-slot path, deferred until every layer has attended; more (a long prompt) compacts layer by layer, so a
#: prompt never holds every layer's full buffers at once
FEW_OVER_MAX = 64


def _is_compiling() -> bool:
    return bool(getattr(torch, "compiler", None) and torch.compiler.is_compiling())


class PruningLayer(SlotLayer):
    """Per-layer slots with the policy's score state; evicts down to the budget after each forward."""

    #: the shared attention path computes this layer's attention (kvprune.caches.contract)
    own_attention = None

    def __init__(self, layer_idx: int, policy: Policy, budget: Budget | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.policy = policy
        self.budget = budget
        #: the policy's fixed numbers, read at every step: the smallest budget it allows, and its score decay at a
        #: one-token step (None: observations are handed to ``finish``, see :meth:`fold_row`)
        self.floor = policy.min_budget()
        self.decay = policy.decode_decay
        self.updates = policy.updates  # False: scores never change once written
        self.scored = policy.scored  # False: nothing ranks the slots, protection alone decides (StreamingLLM)
        self.rests = policy.rests_between_evictions  # TOVA: steps between amortised evictions observe nothing
        self.ranks_whole_cache = type(policy).eviction_scores is not Policy.eviction_scores  # KeyDiff, SnapKV
        self.prefill_only = False  # set by the cache: evict once, after the first forward
        self.evict_every = 1  # set by the cache: one-token steps evict at every this many of them
        #: set by the cache: one-over decode evictions chosen with the other layers' (None: each layer alone)
        self.deferred: DeferredEvictions | None = None
        self.reset()

    # -- transformers' layer contract --------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._init_slots(key_states, value_states)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens; the attention function then observes, scores and evicts."""
        if _is_compiling():
            raise UnsupportedGenerationModeError(
                "kvprune caches change shape at every step and cannot run under torch.compile; "
                "generate without compile (drop `compile_config`/`torch.compile`) or use policy='full' with "
                "transformers' StaticCache"
            )
        if self.eviction_due:  # a forward ended before every layer had attended: evict before attending again
            self.deferred.flush()
        if self.generation is not None and self.stacked.disabled:  # layers on several devices: buffers of its own
            self._reserve(self._bufs[0].shape[-2])
        if self.pending:
            raise CacheUsageError(
                "the previous forward never reached kvprune's attention function. Prepare the model with "
                "kvprune.prepare_model(model) or build the cache with kvprune.make_cache(model, ...)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        if b != self.keys.shape[0] or h != self.keys.shape[1]:
            raise BatchMismatchError(
                f"layer {self.layer_idx} holds batch {self.keys.shape[0]} x {self.keys.shape[1]} KV heads but got "
                f"{b} x {h}; use one cache per batch (cache.reset() to start over)"
            )
        check_layout(self.layer_idx, self.keys, self.values, key_states, value_states)
        # the new tokens go into free slots at the end of the buffers (no copy of the cache, unlike a
        # concatenation); free slots already hold the defaults rank -1, valid, score 0
        n = self.keys.shape[-2]
        if self._bufs is None or n + q > self._bufs[0].shape[-2]:
            self._reserve(room(n + q), stacked=q == 1)  # a prompt's buffers stay the layer's own
        if q == 1:
            kt, vt, pt = self._tail(n)
            kt.copy_(key_states)
            vt.copy_(value_states)
            pt.fill_(self.n_seen)
        else:
            kbuf, vbuf, pbuf = self._bufs[:3]
            kbuf[:, :, n : n + q] = key_states
            vbuf[:, :, n : n + q] = value_states
            pbuf[:, :, n : n + q] = torch.arange(self.n_seen, self.n_seen + q, dtype=INDEX_DTYPE, device=self.device)
        self._use_slots(n + q)
        # evict_every=k: a one-token step evicts at every k-th one-token step since the last multi-token forward
        # or the first one (the prompt, which always evicts). Counted in steps, not in tokens seen: tokens seen
        # include a batch's left padding, so a padded row would evict at other steps than the same row alone
        self.one_token_steps = 0 if q > 1 or self.n_seen == 0 else self.one_token_steps + 1
        self.evicts = self.one_token_steps % self.evict_every == 0
        self.n_seen += q
        self.pending = q
        self.resting = q == 1 and self.rests and not self.evicts
        return bind(self.keys, self), self.values

    @property
    def frozen(self) -> bool:
        """Nothing to observe or evict this step: ``prefill_only`` past the prompt, or a one-token step between
        amortised evictions under a policy whose scores are just its newest observation (TOVA), which the next
        evicting step replaces anyway."""
        return self.sealed or self.resting

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self.sealed = value

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        """Logical sizes: the mask function hands the whole 2D padding mask to kvprune's attention."""
        q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return self.n_seen + q, 0

    def get_seq_length(self) -> int:
        """Tokens seen (logical), so generate's positions stay right after evictions."""
        return self.n_seen

    def reset(self) -> None:
        self._reset_slots()
        self.n_seen = 0
        self.pending = 0
        self.one_token_steps = 0  # since the last multi-token forward (see update)
        self.evicts = False  # this forward evicts when it finishes
        if self.deferred is not None:
            self.deferred.discard(self)
        self.eviction_due = False  # handed to ``deferred``, not yet dropped
        self.sealed = False  # prefill_only and past the first forward: no scores, no eviction
        self.resting = False  # this step neither evicts nor keeps what it would observe (see ``frozen``)
        self.folded = False  # this step's observation is already in the scores (fold_row)
        self.is_initialized = False

    def select_rows(self, index: torch.Tensor) -> None:
        if self.eviction_due:
            self.deferred.flush()
        self._select_slot_rows(index)

    # -- the kvprune side: called by the attention function ------------------------------------
    def observe_padding(self, new_valid: torch.Tensor | None) -> None:
        """Record which new tokens are real (``[B, q]`` bool, None = all) and give them initial scores."""
        q = self.pending
        b, h = self.keys.shape[:2]
        if new_valid is None or bool(new_valid.all()):  # no padding among the new tokens (the common decode step)
            if not self.ranks_are_positions:  # else a rank is the position update() wrote
                if q == 1:
                    self.ranks[:, :, -1] = self.n_valid[:, None]
                else:
                    ranks = self.n_valid[:, None] + torch.arange(q, device=self.device)
                    self.ranks[..., -q:] = ranks.to(INDEX_DTYPE)[:, None, :]
            self.n_valid = self.n_valid + q
        else:
            if self.ranks_are_positions:
                self._split_ranks()
            new_valid = new_valid.to(self.device, torch.bool)
            ranks = self.n_valid[:, None] + new_valid.long().cumsum(-1) - 1
            self.ranks[..., -q:] = torch.where(new_valid, ranks, -1).to(INDEX_DTYPE)[:, None, :]
            self.n_valid = self.n_valid + new_valid.sum(-1)
            self.valid[..., -q:] = new_valid[:, None, :]
            self.all_valid = False
        # the default is the zeros update() wrote; a sealed layer (prefill_only) never ranks what it appends
        if type(self.policy).initial_scores is not Policy.initial_scores and not self.sealed:
            keyed = getattr(self.policy, "keyed_by_head", False)  # e.g. random: hashed by the global head index
            extra = {"head_offset": parallel_of(self).head_offset(h)} if keyed else {}
            init = self.policy.initial_scores(self.policy_keys(q), self.ranks[..., -q:].long(), self.layer_idx, **extra)
            self.scores[..., -q:] = init.to(torch.float32).expand(b, h, q)

    def attention_allowed(self, n_queries: int, sliding_window: int | None = None) -> torch.Tensor | None:
        """Which slots each new query may attend: ``[B, H or 1, q, S]`` bool, from positions and validity.

        None when every slot is visible: a decode step (every kept token precedes the query) with no
        padding slot and no sliding window that cuts into the cache.
        """
        if n_queries == 1 and self.all_valid and (sliding_window is None or sliding_window >= self.n_seen):
            return None
        src = slice(0, 1) if self.heads_aligned else slice(None)
        kpos = self.positions[:, src, None, :]
        qpos = torch.arange(self.n_seen - n_queries, self.n_seen, device=self.device, dtype=INDEX_DTYPE)
        qpos = qpos[None, None, :, None]
        allowed = self.valid[:, src, None, :] & (kpos <= qpos)
        if sliding_window is not None:
            allowed &= kpos > qpos - sliding_window
        # a padding query sees only itself, so its (unused) softmax row is finite
        return allowed | (kpos == qpos)

    def is_plain_causal(self, n_queries: int, sliding_window: int | None = None) -> bool:
        """Whether the mask is plain causal over the slots: a fresh prefill with no padding."""
        return (
            self.n_seen == n_queries == self.keys.shape[-2]
            and self.all_valid
            and (sliding_window is None or sliding_window >= n_queries)
        )

    def ordered_queries(self) -> None:
        """The new queries are the newest slots, in order, after every older slot: no staircase needed."""
        return None

    def finish(self, obs: torch.Tensor | None) -> None:
        """Fold the observation into the scores and evict down to the budget (once, with ``prefill_only``;
        at one-token steps every ``evict_every`` of them)."""
        if self.frozen:
            self.pending = 0
            return
        folded, self.folded = self.folded, False
        if self.updates and not folded and (obs is not None or self.policy.observation == "none"):
            scores = self.policy.update_scores(self.scores, obs, self.pending)
            if scores is not self.scores:
                self.scores.copy_(scores)  # in place: the scores are a view of their buffer
        self.pending = 0
        if self.evicts:  # evict_every=k: only every k-th one-token step, a block at once (see update)
            self.evict()
        self.frozen = self.prefill_only

    def fold_row(self, rows: torch.Tensor) -> bool:
        """Fold a decode step's softmax rows ``[B * Hkv, G, S]`` into the scores now, averaged over the query heads in
        the same op, when the policy's update is a :meth:`~kvprune.policies.Policy.decay` (``finish`` then gets no
        observation); False: it cannot (another rule, a head mean over several tensor-parallel ranks, or float64 rows
        of a float64 model: the scores are float32)."""
        if (self.decay is None or self.frozen or rows.dtype != torch.float32
                or (self.policy.shared_across_heads and parallel_of(self).active)):
            return False
        self.policy.fold_rows(self.scores, rows, self.decay)
        self.folded = True
        return True

    def capacity(self) -> torch.Tensor | None:
        """Slots each row may fill now, ``[B]`` (None: unbounded). Rows get their own ratio budgets."""
        if self.budget is None or not self.policy.evicts or self.n_valid is None:
            return None
        return self.budget.slots(self.n_valid, self.floor)

    def protected(self, caps: torch.Tensor) -> torch.Tensor:
        """Sinks, the recent window and the newest token of each row: ``[B, H, S]`` bool."""
        recent = self.policy.recent_tokens(caps).clamp(min=1)
        first_recent = (self.n_valid - recent)[:, None, None]
        return self.valid & ((self.ranks < self.policy.n_sink) | (self.ranks >= first_recent))

    def evict(self) -> None:
        if self._evict_over():
            return
        caps = self.capacity()
        if caps is None:
            return
        cap = int(caps.max())
        if self.keys.shape[-2] <= cap and not bool((self.valid.sum(-1) > caps[:, None]).any()):
            return
        if not self.in_position_order:  # ties below go to the earlier slot, which must be the older token
            self._adopt(self.positions.argsort(dim=-1))
            self.in_position_order = True
        eff = self.scores
        if self.ranks_whole_cache:
            eff = self.policy.eviction_scores(eff, self.policy_keys(), self.ranks, self.valid, self.n_valid)
        eff = rank_grid(eff).masked_fill(self.protected(caps), float("inf")).masked_fill(~self.valid, float("-inf"))
        # stable sort: among equal scores the older token (earlier slot) wins, deterministically (a decode step one
        # over every row's budget takes _evict_over instead, which decides the same)
        order = eff.sort(dim=-1, descending=True, stable=True).indices[..., :cap]
        keep, perm = order.sort(dim=-1)
        before = int(self.valid.sum())
        # the kept slots are copied once, into buffers with one free slot at the end where the next decode
        # step writes its token (one copy of the cache per step instead of two: append + compact)
        self._adopt(keep, stacked=True)
        # a row whose own budget is below the widest row's keeps its surplus slots as padding
        self.valid &= perm < caps[:, None, None]
        after = int(self.valid.sum())
        self.evictions += before - after
        self.all_valid = after == self.valid.numel()
        if self._aligned:  # once heads diverge they are treated as unaligned (a per-head mask)
            self.heads_aligned = None  # checked when asked

    def _evict_over(self) -> bool:
        """The common decode step: every row has the same budget and each (row, KV head) holds the same few slots
        over it (one at a decode step; k with ``evict_every=k``; a short chunk's length; padding slots count, and go
        first). The victims (:func:`~kvprune.caches.decode.few_over_victims`, what the general path decides) are
        chosen with the other layers' once they have attended (``deferred``), or now. False: the general path
        must run (most slots go, as after a long prompt, or rows have different budgets)."""
        budget = self.budget
        if budget is None or not self.policy.evicts:
            return False
        if budget.tokens is not None or self.ranks_are_positions:  # no padding seen: every row saw n_seen tokens
            cap = budget.slots_for(self.n_seen, self.floor)
        else:  # a ratio of the tokens seen: the fast path when every row may hold the same count now
            caps = self.capacity()
            cap = int(caps.min())
            if cap != int(caps.max()):
                return False
        s = self.keys.shape[-2]
        if s <= cap:
            return True  # no row holds more than its budget: nothing to evict
        over = s - cap
        if over > min(cap, FEW_OVER_MAX):
            return False
        eff = self.scores if self.scored else None  # None: nothing scored, protection alone decides
        if self.ranks_whole_cache:
            eff = self.policy.eviction_scores(eff, self.policy_keys(), self.ranks, self.valid, self.n_valid)
        recent = max(1, self.policy.recent_count(cap))
        if self.deferred is not None:
            self.eviction_due = True
            self.deferred.defer(self, eff, recent, self.policy.n_sink, over)
        else:
            evict_over([(self, eff)], recent, self.policy.n_sink, over)
        return True

    def after_drop(self, evicted: int, held: int) -> None:
        super().after_drop(evicted, held)
        self.eviction_due = False

    @property
    def moves_scores(self) -> bool:
        return self.scored

    @property
    def heads_drop_alike(self) -> bool:
        return self.policy.shared_across_heads

    def policy_keys(self, new: int = 0) -> torch.Tensor:
        """The keys a policy reads, ``[B, H, S, D]`` float: the ``new`` newest slots, or every held slot with 0
        (a quantized layer, kvprune.caches.quantized, dequantizes them)."""
        return self.keys[..., -new:, :] if new else self.keys

    # -- introspection (kvprune.caches.base.KVLayer) --------------------------------------------
    def evicted(self) -> int:
        return self.evictions
