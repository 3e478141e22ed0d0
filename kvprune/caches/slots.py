"""Slot storage of one cache layer: keys, values and per-slot metadata in buffers with free slots at the end.

Tensors are rectangular ``[batch, kv_heads, slots, ...]``; a slot that holds no token (padding)
has ``valid == False`` and is masked out. ``positions`` is each token's logical index in the
stream (what transformers calls its cache position); ``ranks`` is its index among the row's
valid tokens, which is what sinks and recent windows are counted in. The held slots are views of the
buffers' front: appends write into free slots, growth copies once into larger buffers, an eviction
either compacts the kept slots into new buffers or moves a few newest slots into the victims' places.
"""

from __future__ import annotations

import torch

from .base import KVLayer, grown
from .stacked import FREE_SLOT, Generation, StackedSlots, flat_slots, move_newest

INDEX_DTYPE = torch.int32
#: held counts whose views a layer keeps: decode steps with ``evict_every=k`` cycle through k + 1 counts (budget
#: to budget + k), so up to k = 64 (the few-slot path) every step reuses its views; a growing cache clears them
#: now and then
VIEWS_KEPT = 66


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

    def get(self: "SlotLayer") -> torch.Tensor | None:
        view = self._meta[i]
        if view is None and self._bufs is not None:
            view = self._meta[i] = self._bufs[2 + i][:, :, : self._held]
        return view

    def set(self: "SlotLayer", value: torch.Tensor | None) -> None:
        self._meta[i] = value

    return property(get, set)


class SlotLayer(KVLayer):
    """A layer's slots: buffers, the views of their held front, and the moves that grow, compact and drop them.

    Subclasses say what a drop must carry (:attr:`moves_scores`) and whether all heads drop alike
    (:attr:`heads_drop_alike`).
    """

    #: the shared buffers this layer's are slices of (:mod:`.stacked`); None: buffers of its own
    generation: Generation | None = None
    #: set by the cache: decode-size buffers as slices of tensors shared by every layer (None: each layer alone)
    stacked: StackedSlots | None = None
    layer_idx: int = 0

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

    @property
    def moves_scores(self) -> bool:
        """Whether the scores are worth carrying when slots move (False: every slot's score is the same)."""
        return True

    @property
    def heads_drop_alike(self) -> bool:
        """Whether every KV head of a row always drops the same slots (one keep-set per row)."""
        return False

    def _reset_slots(self) -> None:
        """No buffers, nothing held (the layer is not initialised)."""
        self._meta: list[torch.Tensor | None] = [None, None, None, None]
        #: held slots -> (keys, values, metadata views) of the current buffers (see _use_slots); slot -> _tail's views
        self._views: dict[int, tuple] = {}
        self._tails: dict[int, tuple] = {}
        #: (keys, values, positions, ranks, valid, scores) buffers; the held slots are their first ``physical_length``
        self._bufs: tuple[torch.Tensor, ...] | None = None
        self._held = 0
        self.keys = self.values = None
        self.positions = self.ranks = self.valid = self.scores = None
        self.n_valid: torch.Tensor | None = None
        self.ranks_are_positions = True  # no padding token seen yet: a token's rank is its position
        self.evictions = 0
        self.heads_aligned = True  # None: not known (checked from positions when asked)
        self.all_valid = True  # no slot is padding (lets decode steps skip the mask)
        self.in_position_order = True  # False after a decode eviction moved the newest slots into the victims'
        #: drop_slots' (held slots, flat views of the buffers, each (row, head)'s first flat slot, its last one)
        self._flat: tuple | None = None
        self._join(None)

    def _init_slots(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Empty slots laid out like ``key_states`` / ``value_states`` ``[B, H, q, D]``, on their device."""
        b, h, _, _ = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((b, h, 0, key_states.shape[-1]))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.positions = torch.empty((b, h, 0), dtype=INDEX_DTYPE, device=self.device)
        self.ranks = torch.empty((b, h, 0), dtype=INDEX_DTYPE, device=self.device)
        self.valid = torch.empty((b, h, 0), dtype=torch.bool, device=self.device)
        self.scores = torch.empty((b, h, 0), dtype=torch.float32, device=self.device)
        self.n_valid = torch.zeros(b, dtype=torch.int64, device=self.device)
        self._set_buffers(None)
        if self.stacked is not None:
            self.stacked.register(self.device)

    def _select_slot_rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of every stored tensor (in that order); the next token reserves new buffers."""
        index = index.to(self.device)
        for name in ("keys", "values", "positions", "ranks", "valid", "scores", "n_valid"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self._set_buffers(None)
        self.all_valid = bool(self.valid.all())
        self.heads_aligned = None  # checked when asked

    # -- buffers with free slots at the end; keys, values and metadata are views of their front --------
    def _use_slots(self, n: int) -> None:
        # the views of n held slots are kept for the buffers' life: decode steps that evict cycle through a few
        # counts (budget + 1 while attending, budget after; up to budget + k with evict_every=k), so they make no views
        views = self._views.get(n)
        if views is None:
            if len(self._views) >= VIEWS_KEPT:
                self._views.clear()
            views = self._views[n] = (self._bufs[0][:, :, :n], self._bufs[1][:, :, :n], [None, None, None, None])
        self.keys, self.values, self._meta = views  # metadata views are made when first used
        self._held = n

    def _tail(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where one token appended at slot ``n`` goes: views of the key, value and position buffers at ``n``, kept
        like :meth:`_use_slots`' views (a decode step that evicts appends at the same slot every time)."""
        tail = self._tails.get(n)
        if tail is None:
            if len(self._tails) >= VIEWS_KEPT:
                self._tails.clear()
            kbuf, vbuf, pbuf = self._bufs[:3]
            tail = self._tails[n] = (kbuf[:, :, n : n + 1], vbuf[:, :, n : n + 1], pbuf[:, :, n])
        return tail

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
        self._set_buffers(bufs)
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
        self._set_buffers(bufs)
        self._use_slots(c)

    def _set_buffers(self, bufs: tuple[torch.Tensor, ...] | None) -> None:
        """Hold ``bufs`` (None: none, the next token reserves new ones), dropping what was made from the old ones."""
        self._bufs, self._flat, self._views, self._tails = bufs, None, {}, {}
        if bufs is None:
            self._join(None)

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

    def drop_slots(self, victims: torch.Tensor, evicted: int) -> None:
        """Drop slots ``victims [B, H, m]`` of each (row, KV head), which holds ``m`` slots over: the newest surviving
        slots move into their places (a copy of ``m`` slots, not of the cache) and the last ``m`` become free again.
        ``evicted``: how many victims were real tokens (a padding victim is no eviction)."""
        held = self.keys.shape[-2]
        if self._flat is None or self._flat[0] != held:  # made once per buffers and held count
            self._flat = (held, *flat_slots(self._bufs, held))
        _, views, starts, last = self._flat
        move_newest(views, victims, starts, held, last, self.moved_kinds(), self.n_seen - 1)
        self.after_drop(evicted, held - victims.shape[-1])

    def moved_kinds(self) -> tuple[int, ...]:
        """The buffers a drop copies (indices into keys, values, positions, ranks, valid, scores) besides positions
        (the newest slot's is always the newest token's, ``n_seen - 1``: filled, not copied): scores only when the
        layer scores (:attr:`moves_scores`), ranks only once they differ from positions, validity only once some slot
        is padding."""
        return ((0, 1) + ((5,) if self.moves_scores else ()) + (() if self.ranks_are_positions else (3,))
                + (() if self.all_valid else (4,)))

    def after_drop(self, evicted: int, held: int) -> None:
        """Bookkeeping once the newest surviving slots have moved into the victims' places: ``held`` slots are held
        now; ``evicted`` victims were real tokens."""
        b, h, s = self.keys.shape[:3]
        self._use_slots(held)
        self.in_position_order = False
        self.evictions += evicted
        if not self.all_valid and evicted < b * h * (s - held):  # a padding slot went: maybe the last one
            self.all_valid = bool(self.valid.all())
        if self._aligned and h > 1 and not self.heads_drop_alike:
            self.heads_aligned = None  # checked when asked

    def kept(self) -> torch.Tensor:
        return self.valid.sum(-1)
