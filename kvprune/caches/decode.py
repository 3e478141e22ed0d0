"""Decode-step eviction one slot over a token budget, for every layer of a cache at once.

At a decode step under a token budget each (row, KV head) of each layer holds exactly one slot too many.
The victims of all layers are chosen with one set of tensor ops once the last layer has attended (a
step's cost is mostly per-op overhead, so one set instead of one per layer), and each layer then moves
its newest slot into the victim's place instead of compacting the cache. Slots are therefore no longer in
position order after a decode eviction; ranks, not slot indices, say which tokens are sinks and recent.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..policies.base import rank_grid
from .stacked import Stacked, drop_together


def one_over_victims(eff: torch.Tensor | None, ranks: torch.Tensor, first_recent: torch.Tensor, n_sink: int,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """The slot each (…, row, head) drops, ``[..., B, H, 1]``, from scores ``eff [..., B, H, S]`` (higher is kept;
    None: nothing is scored, every slot ties).

    Protected: the sinks (``ranks < n_sink``) and the recent window (``ranks >= first_recent [..., B, 1, 1]``).
    A padding slot (``valid`` False) goes first; among the rest the lowest score on
    :func:`~kvprune.policies.base.rank_grid` goes, the newest (highest rank) among equals: exactly what the
    stable sort of the general eviction keeps and drops (which padding slot goes does not matter).
    """
    protected = (ranks < n_sink) | (ranks >= first_recent)
    if eff is None:  # all tie: the newest unprotected slot, padding first
        key = ranks.masked_fill(protected, -2)
        if valid is not None:
            key.masked_fill_(~valid, torch.iinfo(key.dtype).max)
        return key.argmax(dim=-1, keepdim=True)
    eff = rank_grid(eff)  # a new tensor: filled in place
    eff.masked_fill_(protected, float("inf"))
    if valid is not None:
        eff.masked_fill_(~valid, float("-inf"))
    low = eff.amin(dim=-1, keepdim=True)
    return ranks.masked_fill(eff != low, -2).argmax(dim=-1, keepdim=True)  # -2: below a padding slot's rank -1


class OneOver(Stacked, Protocol):
    """A layer :func:`evict_one_over` serves: its ranks, validity and token counts, and the drop itself."""

    ranks: torch.Tensor
    valid: torch.Tensor
    n_valid: torch.Tensor
    all_valid: bool

    def drop_slots(self, victim: torch.Tensor, evicted: int | None = None) -> None: ...


def evict_one_over(members: list[tuple[OneOver, torch.Tensor | None]], recent: int, n_sink: int) -> None:
    """Evict one slot of each (row, head) of every layer in ``members`` (layer, its eviction scores or None for all
    alike; layers of one shape), protecting ``n_sink`` sinks and the ``recent`` newest tokens, with one set of ops
    for all of them."""
    layers = [layer for layer, _ in members]
    padded = not all(layer.all_valid for layer in layers)
    ranks = torch.stack([layer.ranks for layer in layers])
    n_valid = torch.stack([layer.n_valid for layer in layers])
    first_recent = (n_valid - recent).view(*n_valid.shape, 1, 1)
    valid = torch.stack([layer.valid for layer in layers]) if padded else None
    eff = None if members[0][1] is None else torch.stack([e for _, e in members])
    victims = one_over_victims(eff, ranks, first_recent, n_sink, valid)
    # a padding victim is no eviction: count the real ones (one sync for every layer)
    evicted = valid.gather(-1, victims).flatten(1).sum(1).tolist() if padded else [None] * len(layers)
    if not drop_together(layers, victims, evicted):  # one op per kind for all layers when their buffers are stacked
        for layer, victim, n in zip(layers, victims.unbind(0), evicted):
            layer.drop_slots(victim, n)


class DeferredEvictions:
    """The one-over decode evictions of a cache's ``n_layers`` layers, held until each has finished its step.

    A layer hands over its eviction scores (:meth:`defer`); when every layer has, the victims are chosen
    together (layers of one shape, window and sink count at once) and each layer drops its own. A forward
    that ends early leaves some due: the next ``update`` of any layer (or a row selection) flushes them first.
    """

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.due: list[tuple[OneOver, torch.Tensor | None, int, int]] = []

    def defer(self, layer: OneOver, eff: torch.Tensor | None, recent: int, n_sink: int) -> None:
        """Evict one slot of each (row, head) of ``layer`` by ``eff``, protecting ``recent`` newest and ``n_sink``."""
        self.due.append((layer, eff, recent, n_sink))
        if len(self.due) >= self.n_layers:
            self.flush()

    def discard(self, layer: OneOver) -> None:
        self.due = [d for d in self.due if d[0] is not layer]

    def flush(self) -> None:
        due, self.due = self.due, []
        groups: dict[tuple, list[tuple[OneOver, torch.Tensor]]] = {}
        for layer, eff, recent, n_sink in due:
            key = (tuple(layer.ranks.shape), layer.ranks.device, eff is None, recent, n_sink)
            groups.setdefault(key, []).append((layer, eff))
        for (*_, recent, n_sink), members in groups.items():
            evict_one_over(members, recent, n_sink)
