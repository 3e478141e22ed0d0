"""One layer of a pruning cache: kept keys/values per (row, KV head) with their positions and scores.

Tensors are rectangular ``[batch, kv_heads, slots, ...]``; a slot that holds no token (padding)
has ``valid == False`` and is masked out. ``positions`` is each token's logical index in the
stream (what transformers calls its cache position); ``ranks`` is its index among the row's
valid tokens, which is what sinks and recent windows are counted in.
"""

from __future__ import annotations

import torch

from ..distributed import parallel_of
from ..errors import BatchMismatchError, CacheUsageError, UnsupportedGenerationModeError
from ..policies import Policy
from ..policies.base import rank_grid
from .base import KVLayer, check_layout, grown, room
from .budget import Budget
from .contract import bind
from .decode import DeferredEvictions, evict_over
from .stacked import FREE_SLOT, Generation, StackedSlots, move_newest

INDEX_DTYPE = torch.int32
#: a decode eviction of at most this many slots per (row, head) (``evict_every`` up to it, a short chunk) takes the
#: few-slot path, deferred until every layer has attended; more (a long prompt) compacts layer by layer, so a
#: prompt never holds every layer's full buffers at once
FEW_OVER_MAX = 64


def take_slots(t: torch.Tensor, keep: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``t[b, h, keep[b, h, c], :]`` as ``[B, H, C, D]``: one row-wise ``index_select`` (several times faster
    than ``gather`` with an index expanded over ``D``, which reads an index per element). ``out``: a contiguous
    ``[B, H, C, D]`` tensor to write into."""
    b, h, s, d = t.shape
    base = torch.arange(b * h, device=t.device).view(b, h, 1) * s
    flat = (keep.long() + base).reshape(-1)
    if out is not None:
        torch.index_select(t.reshape(b * h * s, d), 0, flat, out=out.view(-1, d))
        return out
    return t.reshape(b * h * s, d).index_select(0, flat).view(b, h, keep.shape[-1], d)


def _held_view(i: int) -> property:
    """Metadata tensor ``i`` (positions, ranks, valid, scores): a view of the held slots of its buffer, made on
    first use after each append (the hot decode path touches two of the four), or a tensor assigned directly."""

    def get(self: "PruningLayer") -> torch.Tensor | None:
        view = self._meta[i]
        if view is None and self._bufs is not None:
            view = self._meta[i] = self._bufs[2 + i][:, :, : self._held]
        return view

    def set(self: "PruningLayer", value: torch.Tensor | None) -> None:
        self._meta[i] = value

    return property(get, set)


def _is_compiling() -> bool:
    return bool(getattr(torch, "compiler", None) and torch.compiler.is_compiling())


class PruningLayer(KVLayer):
    """Per-layer storage with the policy's score state; evicts down to the budget after each forward."""

    #: the shared attention path computes this layer's attention (kvprune.caches.contract)
    own_attention = None
    #: the shared buffers this layer's are slices of (:mod:`.stacked`); None: buffers of its own
    generation: Generation | None = None

    positions = _held_view(0)
    _ranks = _held_view(1)
    valid = _held_view(2)
    scores = _held_view(3)

    @property
    def ranks(self) -> torch.Tensor | None:
        """Each slot's index among its row's real tokens seen: the position itself until a padding token is seen
        (then a tensor of its own), so unpadded steps neither write nor move ranks."""
        return self.positions if self.ranks_are_positions else self._ranks

    @ranks.setter
    def ranks(self, value: torch.Tensor | None) -> None:
        self._ranks = value

    @property
    def heads_aligned(self) -> bool:
        """Whether every KV head of a row holds the same positions in the same slots (one mask serves them all);
        checked when first asked after a decode eviction that may have split them."""
        if self._aligned is None:
            self._aligned = bool((self.positions == self.positions[:, :1]).all())
        return self._aligned

    @heads_aligned.setter
    def heads_aligned(self, value: bool | None) -> None:
        self._aligned = value

    def __init__(self, layer_idx: int, policy: Policy, budget: Budget | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.policy = policy
        self.budget = budget
        self.prefill_only = False  # set by the cache: evict once, after the first forward
        self.evict_every = 1  # set by the cache: one-token steps evict every this many tokens seen
        #: set by the cache: one-over decode evictions chosen with the other layers' (None: each layer alone)
        self.deferred: DeferredEvictions | None = None
        #: set by the cache: decode-size buffers as slices of tensors shared by every layer (None: each layer alone)
        self.stacked: StackedSlots | None = None
        self.reset()

    # -- transformers' layer contract --------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, _ = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((b, h, 0, key_states.shape[-1]))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.positions = torch.empty((b, h, 0), dtype=INDEX_DTYPE, device=self.device)
        self.ranks = torch.empty((b, h, 0), dtype=INDEX_DTYPE, device=self.device)
        self.valid = torch.empty((b, h, 0), dtype=torch.bool, device=self.device)
        self.scores = torch.empty((b, h, 0), dtype=torch.float32, device=self.device)
        self.n_valid = torch.zeros(b, dtype=torch.int64, device=self.device)
        self._bufs = self._flat = None
        self._join(None)
        self._views = {}
        if self.stacked is not None:
            self.stacked.register(self.device)
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
        kbuf, vbuf, pbuf = self._bufs[:3]
        kbuf[:, :, n : n + q] = key_states
        vbuf[:, :, n : n + q] = value_states
        if q == 1:
            pbuf[:, :, n].fill_(self.n_seen)
        else:
            pbuf[:, :, n : n + q] = torch.arange(self.n_seen, self.n_seen + q, dtype=INDEX_DTYPE, device=self.device)
        self._use_slots(n + q)
        self.n_seen += q
        self.pending = q
        self.resting = q == 1 and self.policy.replaces_scores and self.n_seen % self.evict_every != 0
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

    # -- storage: buffers with free slots at the end; keys, values and metadata are views of their front
    def _use_slots(self, n: int) -> None:
        # the views of n held slots are kept for the buffers' life: a decode step that evicts alternates between
        # two counts (budget + 1 while attending, budget after), so it makes no views at all
        views = self._views.get(n)
        if views is None:
            if len(self._views) >= 2:
                self._views.clear()
            views = self._views[n] = (self._bufs[0][:, :, :n], self._bufs[1][:, :, :n], [None, None, None, None])
        self.keys, self.values, self._meta = views  # metadata views are made when first used
        self._held = n

    def _reserve(self, slots: int, stacked: bool = False) -> None:
        """Move the held slots to the front of new buffers of ``slots`` slots; the rest are free, with defaults.
        ``stacked``: the buffers may be this layer's slices of the cache's shared ones (:mod:`.stacked`)."""
        n = self.keys.shape[-2]
        held = (self.keys, self.values, self.positions, self.ranks, self.valid, self.scores)
        bufs = self._new_buffers(held, slots, stacked)
        if bufs is None:
            bufs = tuple(grown(t, n, slots, 2, default) for t, default in zip(held, FREE_SLOT))
        else:
            for t, buf, default in zip(held, bufs, FREE_SLOT):
                buf[:, :, :n] = t
                if default is not None:
                    buf[:, :, n:] = default
        self._bufs, self._flat, self._views = bufs, None, {}
        self._use_slots(n)

    def _adopt(self, keep: torch.Tensor, stacked: bool = False) -> None:
        """Hold exactly the slots ``keep [B, H, C]`` (in that order), plus one free slot for the next token.
        ``stacked``: the buffers may be this layer's slices of the cache's shared ones (:mod:`.stacked`)."""
        b, h, c = keep.shape
        idx = torch.cat([keep, keep[..., -1:]], dim=-1)  # the free slot starts as a copy: overwritten by the next token
        kv = self._kv_storage()
        meta = (self.positions, self.ranks, self.valid, self.scores)
        bufs = self._new_buffers((*kv, *meta), c + 1, stacked)
        if bufs is None:
            bufs = (*(take_slots(t, idx) for t in kv), *(t.gather(2, idx) for t in meta))
        else:
            for t, buf in zip(kv, bufs):
                take_slots(t, idx, out=buf)
            for t, buf in zip(meta, bufs[2:]):
                torch.gather(t, 2, idx, out=buf)
        for t, default in zip(bufs[2:], FREE_SLOT[2:]):
            if default is not None:
                t[:, :, c:] = default
        self._bufs, self._flat, self._views = bufs, None, {}
        self._use_slots(c)

    def _new_buffers(self, like: tuple[torch.Tensor, ...], slots: int, stacked: bool) -> tuple[torch.Tensor, ...] | None:
        """This layer's slices of the cache's shared buffers when ``stacked`` and the layout allows, else None
        (the caller allocates the layer's own); sets :attr:`generation` either way."""
        taken = self.stacked.take(self.layer_idx, like, slots) if stacked and self.stacked is not None else None
        self._join(None if taken is None else taken[0])
        return None if taken is None else taken[1]

    def _join(self, gen: Generation | None) -> None:
        """Hold buffers of generation ``gen`` (None: of the layer's own), letting go of the previous one."""
        old = self.generation
        if old is not None and old is not gen and self.stacked is not None:
            self.stacked.release(self.layer_idx, old)
        self.generation = gen

    def _kv_storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous tensors whose first slots are ``keys`` / ``values`` (the buffers, or the tensors themselves)."""
        return self._bufs[:2] if self._bufs is not None else (self.keys.contiguous(), self.values.contiguous())

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        """Logical sizes: the mask function hands the whole 2D padding mask to kvprune's attention."""
        q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return self.n_seen + q, 0

    def get_seq_length(self) -> int:
        """Tokens seen (logical), so generate's positions stay right after evictions."""
        return self.n_seen

    def reset(self) -> None:
        self._meta: list[torch.Tensor | None] = [None, None, None, None]
        #: held slots -> (keys, values, metadata views) of the current buffers (see _use_slots)
        self._views: dict[int, tuple] = {}
        #: (keys, values, positions, ranks, valid, scores) buffers; the held slots are their first ``physical_length``
        self._bufs: tuple[torch.Tensor, ...] | None = None
        self._held = 0
        self.keys = self.values = None
        self.positions = self.ranks = self.valid = self.scores = None
        self.n_valid: torch.Tensor | None = None
        self.ranks_are_positions = True  # no padding token seen yet: a token's rank is its position
        self.n_seen = 0
        self.pending = 0
        self.evictions = 0
        self.heads_aligned = True  # None: not known (checked from positions when asked)
        self.all_valid = True  # no slot is padding (lets decode steps skip the mask)
        self.in_position_order = True  # False after a decode eviction moved the newest slot into the victim's
        if self.deferred is not None:
            self.deferred.discard(self)
        self.eviction_due = False  # handed to ``deferred``, not yet dropped
        #: drop_slots' (held slots, flat views of the buffers, each (row, head)'s first flat slot, its last one)
        self._flat: tuple | None = None
        self._join(None)
        self.sealed = False  # prefill_only and past the first forward: no scores, no eviction
        self.resting = False  # this step neither evicts nor keeps what it would observe (see ``frozen``)
        self.is_initialized = False

    def select_rows(self, index: torch.Tensor) -> None:
        if self.eviction_due:
            self.deferred.flush()
        index = index.to(self.device)
        for name in ("keys", "values", "positions", "ranks", "valid", "scores", "n_valid"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self._bufs = self._flat = None  # the next token reserves new buffers
        self._join(None)
        self._views = {}
        self.all_valid = bool(self.valid.all())
        self.heads_aligned = None  # checked when asked

    # -- the kvprune side: called by the attention function ------------------------------------
    def observe_padding(self, new_valid: torch.Tensor | None) -> None:
        """Record which new tokens are real (``[B, q]`` bool, None = all) and give them initial scores."""
        q = self.pending
        b, h = self.keys.shape[:2]
        if new_valid is None or bool(new_valid.all()):  # no padding among the new tokens (the common decode step)
            if self.ranks_are_positions:
                pass
            elif q == 1:
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

    def _split_ranks(self) -> None:
        """A padding token is about to be seen: ranks get a tensor of their own (the positions so far, -1 free)."""
        self.ranks_are_positions = False
        if self._bufs is None:
            self._ranks = self.positions.clone()
            return
        held, buf = self._held, self._bufs[3]
        buf[:, :, :held].copy_(self._bufs[2][:, :, :held])
        buf[:, :, held:] = FREE_SLOT[3]
        self._meta[1] = None

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
        at decode steps every ``evict_every`` tokens)."""
        if self.frozen:
            self.pending = 0
            return
        stateless = type(self.policy).update_scores is Policy.update_scores  # scores never change after writing
        if not stateless and (obs is not None or self.policy.observation == "none"):
            scores = self.policy.update_scores(self.scores, obs, self.pending)
            if scores is not self.scores:
                self.scores.copy_(scores)  # in place: the scores are a view of their buffer
        q, self.pending = self.pending, 0
        # amortised eviction: a one-token step evicts only every evict_every tokens (a block at once);
        # a multi-token forward (the prompt) always does
        if q > 1 or self.evict_every == 1 or self.n_seen % self.evict_every == 0:
            self.evict()
        self.frozen = self.prefill_only

    def capacity(self) -> torch.Tensor | None:
        """Slots each row may fill now, ``[B]`` (None: unbounded). Rows get their own ratio budgets."""
        if self.budget is None or not self.policy.evicts or self.n_valid is None:
            return None
        return self.budget.slots(self.n_valid, self.policy.min_budget())

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
        if type(self.policy).eviction_scores is not Policy.eviction_scores:
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
        if budget.tokens is not None:
            cap = max(budget.tokens, self.policy.min_budget())
        elif self.ranks_are_positions:  # no padding seen: every row has seen n_seen real tokens (no tensor ops)
            cap = budget.slots_for(self.n_seen, self.policy.min_budget())
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
        eff = self.scores if self.policy.scored else None  # None: nothing scored, protection alone decides
        if type(self.policy).eviction_scores is not Policy.eviction_scores:
            eff = self.policy.eviction_scores(eff, self.policy_keys(), self.ranks, self.valid, self.n_valid)
        recent = max(1, self.policy.recent_count(cap))
        if self.deferred is not None:
            self.eviction_due = True
            self.deferred.defer(self, eff, recent, self.policy.n_sink, over)
        else:
            evict_over([(self, eff)], recent, self.policy.n_sink, over)
        return True

    def drop_slots(self, victims: torch.Tensor, evicted: int) -> None:
        """Drop slots ``victims [B, H, m]`` of each (row, KV head), which holds ``m`` slots over: the newest surviving
        slots move into their places (a copy of ``m`` slots, not of the cache) and the last ``m`` become free again.
        ``evicted``: how many victims were real tokens (a padding victim is no eviction)."""
        held = self.keys.shape[-2]
        if self._flat is None or self._flat[0] != held:  # flat views of the buffers, made once per buffers and size
            b, h, size = self._bufs[0].shape[:3]
            starts = (torch.arange(b * h, device=self.device) * size).view(b, h, 1)  # each (row, head)'s slot 0, flat
            flat = tuple(t.view(b * h * size, -1) if t.dim() == 4 else t.view(-1) for t in self._bufs)
            self._flat = (held, flat, starts, (starts + held - 1).view(-1))
        _, views, starts, last = self._flat
        move_newest(views, victims, starts, held, last, self.moved_kinds(), self.n_seen - 1)
        self.after_drop(evicted, held - victims.shape[-1])

    def moved_kinds(self) -> tuple[int, ...]:
        """The buffers a drop copies (indices into keys, values, positions, ranks, valid, scores) besides positions
        (the newest slot's is always the newest token's, ``n_seen - 1``: filled, not copied): scores only when the
        policy scores, ranks only once they differ from positions, validity only once some slot is padding."""
        return ((0, 1) + ((5,) if self.policy.scored else ()) + (() if self.ranks_are_positions else (3,))
                + (() if self.all_valid else (4,)))

    def after_drop(self, evicted: int, held: int) -> None:
        """Bookkeeping once the newest surviving slots have moved into the victims' places: ``held`` slots are held
        now; ``evicted`` victims were real tokens."""
        b, h, s = self.keys.shape[:3]
        self._use_slots(held)
        self.in_position_order = self.eviction_due = False
        self.evictions += evicted
        if not self.all_valid and evicted < b * h * (s - held):  # a padding slot went: maybe the last one
            self.all_valid = bool(self.valid.all())
        if self._aligned and h > 1 and not self.policy.shared_across_heads:  # shared: every head drops alike
            self.heads_aligned = None  # checked when asked

    def policy_keys(self, new: int = 0) -> torch.Tensor:
        """The keys a policy reads, ``[B, H, S, D]`` float: the ``new`` newest slots, or every held slot with 0
        (a quantized layer, kvprune.caches.quantized, dequantizes them)."""
        return self.keys[..., -new:, :] if new else self.keys

    # -- introspection (kvprune.caches.base.KVLayer) --------------------------------------------
    def kept(self) -> torch.Tensor:
        return self.valid.sum(-1)

    def evicted(self) -> int:
        return self.evictions
