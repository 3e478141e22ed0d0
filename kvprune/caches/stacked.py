"""Every layer's decode-size buffers as slices of one tensor per kind, so a decode eviction moves slots in all
layers with one op per kind.

A decode step one over the budget moves each layer's newest slot into its victim's place (:mod:`.decode`). With
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
        #: (held slots - 1, layer indices) -> (flat views, each (layer, row, head)'s first flat slot, its last one)
        self._flat: dict[tuple[int, tuple[int, ...]], tuple] = {}

    def flat(self, last: int, layers: tuple[int, ...]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """Flat ``[layers * B * H * slots, ...]`` views of every kind, the flat index of slot 0 of each (row, head) of
        ``layers`` (``[len(layers), B, H, 1]``), and of its slot ``last`` (flat ``[len(layers) * B * H]``)."""
        key = (last, layers)
        if key not in self._flat:
            n, b, h, size = self.tensors[0].shape[:4]
            views = tuple(t.view(n * b * h * size, -1) if t.dim() == 5 else t.view(-1) for t in self.tensors)
            starts = (torch.arange(n * b * h, device=self.tensors[0].device) * size).view(n, b, h, 1)
            if layers != tuple(range(n)):
                starts = starts[list(layers)]
            self._flat[key] = (views, starts, (starts + last).view(-1))
        return self._flat[key]


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

    def after_drop(self, evicted: int | None, last: int) -> None: ...


#: what a free slot holds, by kind (keys, values, positions, ranks, valid, scores); None: written by the append
FREE_SLOT = (None, None, None, -1, True, 0.0)


def drop_together(layers: list[Stacked], victims: torch.Tensor, evicted: list[int | None]) -> bool:
    """Drop slot ``victims [L, B, H, 1]`` of each layer in ``layers`` (each one slot over, all in one generation
    with the same held count and storage flags): every layer's newest slot moves into its victim's place with one
    op per kind. False (nothing done) when the layers do not share a generation that way."""
    gen = layers[0].generation
    s, n = layers[0].keys.shape[-2], layers[0].n_seen
    kinds = layers[0].moved_kinds()
    if gen is None or any(
        layer.generation is not gen or layer.keys.shape[-2] != s or layer.n_seen != n or layer.moved_kinds() != kinds
        for layer in layers
    ):
        return False
    views, starts, src = gen.flat(s - 1, tuple(layer.layer_idx for layer in layers))
    move_newest(views, (victims + starts).view(-1), src, kinds, n - 1)
    for layer, count in zip(layers, evicted):
        layer.after_drop(count, s - 1)
    return True


def move_newest(views: tuple[torch.Tensor, ...], dst: torch.Tensor, src: torch.Tensor, kinds: tuple[int, ...],
                newest_position: int) -> None:
    """Copy flat slots ``src`` (the newest) into ``dst`` (the victims) in each of ``kinds`` of the flat buffer views,
    write ``newest_position`` as the victims' position, then give the freed ``src`` slots their free-slot defaults."""
    views[2].index_fill_(0, dst, newest_position)
    for k in kinds:
        views[k].index_copy_(0, dst, views[k].index_select(0, src))
    for k in kinds:
        if FREE_SLOT[k] is not None:
            views[k].index_fill_(0, src, FREE_SLOT[k])
