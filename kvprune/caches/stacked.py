"""Every layer's decode-size buffers as slices of one tensor per kind, so a decode eviction moves slots in all
layers with one op per kind.

A decode step a few slots over the budget moves each layer's newest slots into its victims' places (:mod:`.decode`). With
each layer's keys, values, positions, ranks, validity and scores in buffers of its own, that is a dozen small ops
per layer, and on a small model a step is mostly per-op overhead. Here the buffers a layer gets after an eviction
(or when it grows by one decode token) are its slice ``[layer]`` of ``[layers, B, H, slots, ...]`` tensors shared
by the cache's layers (a *generation*), and the move is one ``index_select`` / ``index_copy_`` pair per kind for
every layer at once. The prompt's own buffers stay per layer, so a long prompt never has every layer's full-size
buffers alive together.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Generation:
    """The ``[layers, B, H, slots, ...]`` tensors of one buffer size and layout, and which layers took their slice."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], spec: tuple) -> None:
        self.tensors = tensors
        self.spec = spec
        self.taken: set[int] = set()
        #: (held slots, layer indices) of the last drop -> :func:`flat_slots` for those layers
        self._flat: tuple | None = None
        #: held slots -> every kind's ``[layers, B, H, held, ...]`` view (see :meth:`held`)
        self._held: tuple[int, tuple[torch.Tensor, ...]] | None = None

    def held(self, held: int) -> tuple[torch.Tensor, ...]:
        """Every kind's first ``held`` slots of every layer, ``[layers, B, H, held, ...]`` views: what stacking each
        layer's held views would copy (kept while the count stays the same)."""
        if self._held is None or self._held[0] != held:
            self._held = (held, tuple(t[:, :, :, :held] for t in self.tensors))
        return self._held[1]

    def flat(self, held: int, layers: tuple[int, ...]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """:func:`flat_slots` of every kind with ``held`` slots, for ``layers`` only (kept while they stay the same)."""
        if self._flat is None or self._flat[0] != (held, layers):
            views, starts, last = flat_slots(self.tensors, held)
            if layers != tuple(range(len(self.tensors[0]))):
                starts = starts[list(layers)]
                last = (starts + held - 1).view(-1)
            self._flat = ((held, layers), (views, starts, last))
        return self._flat[1]


def flat_slots(bufs: tuple[torch.Tensor, ...], held: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """Buffers ``[..., slots]`` / ``[..., slots, D]`` (positions is kind 2, with no ``D``) as flat views with a slot
    per row, the flat index of slot 0 of each leading index (``[..., 1]``), and of slot ``held - 1`` (flat)."""
    lead = bufs[2].shape[:-1]
    size = bufs[2].shape[-1]
    rows = lead.numel() * size
    views = tuple(t.view(rows, -1) if t.dim() > len(lead) + 1 else t.view(-1) for t in bufs)
    starts = (torch.arange(lead.numel(), device=bufs[2].device) * size).view(*lead, 1)
    return views, starts, (starts + held - 1).view(-1)


class StackedSlots:
    """The generations of a cache's ``n_layers`` layers: layer 0 starts one, the others join it with the same layout.

    Only while every layer's keys live on one device: a model split across devices (``device_map``) would otherwise
    get every layer's decode buffers on the first layer's device, so there each layer keeps buffers of its own.
    """

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.current: Generation | None = None
        self.device: torch.device | None = None  # the one device the layers' keys live on so far
        self.disabled = False  # the layers live on more than one device: no shared buffers

    def register(self, device: torch.device) -> None:
        """A layer's keys live on ``device``; a second device turns sharing off for good (a layer holding a slice
        then moves to buffers of its own at its next step, :attr:`disabled`)."""
        if self.device is None:
            self.device = device
        elif device != self.device and not self.disabled:
            self.disabled = True
            self.current = None

    def take(self, layer_idx: int, like: tuple[torch.Tensor, ...], slots: int) -> tuple[Generation, tuple] | None:
        """Empty buffers of ``slots`` slots laid out like ``like`` (``[B, H, any, ...]`` per kind) for layer
        ``layer_idx``: its slices of a new generation (layer 0) or of the current one when the layout matches and
        the layer has no slice of it yet; None otherwise (the layer allocates its own)."""
        if self.disabled:
            return None
        spec = tuple((tuple(t.shape[:2]), tuple(t.shape[3:]), t.dtype, t.device) for t in like) + (slots,)
        gen = self.current
        if layer_idx == 0:
            tensors = tuple(
                torch.empty((self.n_layers, *t.shape[:2], slots, *t.shape[3:]), dtype=t.dtype, device=t.device)
                for t in like
            )
            gen = self.current = Generation(tensors, spec)
        elif gen is None or gen.spec != spec or layer_idx in gen.taken or layer_idx >= self.n_layers:
            return None
        gen.taken.add(layer_idx)
        return gen, tuple(t[layer_idx] for t in gen.tensors)


    def release(self, layer_idx: int, gen: Generation) -> None:
        """Layer ``layer_idx`` no longer uses its slice of ``gen``: the current generation is let go (its memory
        freed with the last layer's buffers) once no layer uses it."""
        if gen is self.current:
            gen.taken.discard(layer_idx)
            if not gen.taken:
                self.current = None


class Stacked(Protocol):
    """A layer :func:`drop_together` serves: its index, generation, storage flags, and the per-layer bookkeeping."""

    layer_idx: int
    generation: Generation | None
    keys: torch.Tensor
    n_seen: int
    ranks_are_positions: bool
    all_valid: bool

    def moved_kinds(self) -> tuple[int, ...]: ...

    def after_drop(self, evicted: int, held: int) -> None: ...


#: what a free slot holds, by kind (keys, values, positions, ranks, valid, scores); None: written by the append
FREE_SLOT = (None, None, None, -1, True, 0.0)


def drop_together(layers: list[Stacked], victims: torch.Tensor, evicted: list[int], checked: bool = False) -> bool:
    """Drop slots ``victims [L, B, H, m]`` of each layer in ``layers`` (each ``m`` slots over, all in one generation
    with the same held count and storage flags; ``evicted``: how many victims were real tokens, per layer): every
    layer's newest surviving slots move into its victims' places with one op per kind. False (nothing done) when
    the layers do not share a generation that way (``checked``: the caller made sure they do)."""
    gen = layers[0].generation
    s, n = layers[0].keys.shape[-2], layers[0].n_seen
    kinds = layers[0].moved_kinds()
    if not checked and (gen is None or any(
        layer.generation is not gen or layer.keys.shape[-2] != s or layer.n_seen != n or layer.moved_kinds() != kinds
        for layer in layers
    )):
        return False
    views, starts, last = gen.flat(s, tuple(layer.layer_idx for layer in layers))
    move_newest(views, victims, starts, s, last, kinds, n - 1)
    for layer, count in zip(layers, evicted):
        layer.after_drop(count, s - victims.shape[-1])
    return True


def refill_pairs(victims: torch.Tensor, held: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where slots move when ``victims [..., m]`` (distinct slots among ``held``) are dropped and the last ``m`` slots
    given up: ``(dst, src)``, ``[..., m]`` each. Each victim below ``held - m`` (a hole) gets one of the last ``m``
    that survives; the pairs left over copy one given-up slot onto another (harmless)."""
    m = victims.shape[-1]
    dst = victims.sort(dim=-1).values  # the holes first
    given_up = torch.zeros((*victims.shape[:-1], held), dtype=torch.bool, device=victims.device)
    given_up.scatter_(-1, victims, True)
    src = given_up[..., held - m :].to(torch.int8).argsort(dim=-1, stable=True) + (held - m)  # survivors first
    return dst, src


def move_newest(views: tuple[torch.Tensor, ...], victims: torch.Tensor, starts: torch.Tensor, held: int,
                last: torch.Tensor, kinds: tuple[int, ...], newest_position: int) -> None:
    """Drop slots ``victims [..., B, H, m]`` of ``held`` from flat buffer views whose (row, head)s start at flat
    ``starts [..., B, H, 1]``: the newest surviving slots move into the victims' places in each of ``kinds`` (and
    positions), and the last ``m`` slots get their free-slot defaults. One victim: the newest slot (flat ``last``)
    moves, and its position is written (``newest_position``), not copied."""
    if victims.shape[-1] == 1:
        dst, src = (victims + starts).view(-1), last
        views[2].index_fill_(0, dst, newest_position)
    else:
        dst, src = refill_pairs(victims, held)
        dst, src = (dst + starts).view(-1), (src + starts).view(-1)
        kinds = (2, *kinds)
    for k in kinds:
        views[k].index_copy_(0, dst, views[k].index_select(0, src))
    for k in kinds:
        if FREE_SLOT[k] is not None:
            views[k].index_fill_(0, src, FREE_SLOT[k])
