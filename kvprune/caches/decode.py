"""Decode-step eviction a few slots over the budget, for every layer of a cache at once.

At a decode step each (row, KV head) of each layer holds one slot too many (``evict_every=k``: k at every k-th
one-token step; a short chunk: its length). The victims of all layers are chosen with one set of tensor ops once the
last layer has attended (a step's cost is mostly per-op overhead, so one set instead of one per layer), and
each layer then moves its newest surviving slots into the victims' places instead of compacting the cache.
Slots are therefore no longer in position order after a decode eviction; ranks, not slot indices, say which
tokens are sinks and recent.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from ..policies.base import rank_grid
from .stacked import Stacked, drop_together


def one_over_victims(eff: torch.Tensor | None, ranks: torch.Tensor, first_recent: torch.Tensor | int, n_sink: int,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """The slot each (…, row, head) drops, ``[..., B, H, 1]``, from scores ``eff [..., B, H, S]`` (higher is kept;
    None: nothing is scored, every slot ties).

    Protected: the sinks (``ranks < n_sink``) and the recent window (``ranks >= first_recent``, ``[..., B, 1, 1]``
    or one int for all).
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
    eff = _ranked(eff, protected, valid)
    low = eff.amin(dim=-1, keepdim=True)
    return ranks.masked_fill(eff != low, -2).argmax(dim=-1, keepdim=True)  # -2: below a padding slot's rank -1


def few_over_victims(eff: torch.Tensor | None, ranks: torch.Tensor, first_recent: torch.Tensor | int, n_sink: int,
                     valid: torch.Tensor | None, over: int) -> torch.Tensor:
    """The ``over`` slots each (…, row, head) drops, ``[..., B, H, over]``: :func:`one_over_victims`'s rule applied
    ``over`` times at once (padding first, then the lowest scores on the grid, the newest among equals)."""
    if over == 1:
        return one_over_victims(eff, ranks, first_recent, n_sink, valid)
    eff = torch.zeros(ranks.shape, device=ranks.device) if eff is None else eff
    eff = _ranked(eff, (ranks < n_sink) | (ranks >= first_recent), valid)
    newest_first = ranks.argsort(dim=-1, descending=True, stable=True)
    lowest = eff.gather(-1, newest_first).argsort(dim=-1, stable=True)[..., :over]  # stable: newest among equals
    return newest_first.gather(-1, lowest)


def _ranked(eff: torch.Tensor, protected: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``eff`` on the ranking grid, as a new tensor: protected slots +inf (never dropped), padding -inf (first)."""
    eff = rank_grid(eff).masked_fill_(protected, float("inf"))
    return eff if valid is None else eff.masked_fill_(~valid, float("-inf"))


class Over(Stacked, Protocol):
    """A layer :func:`evict_over` serves: its ranks, validity and token counts, and the drop itself."""

    ranks: torch.Tensor
    valid: torch.Tensor
    scores: torch.Tensor
    n_valid: torch.Tensor
    all_valid: bool

    def drop_slots(self, victims: torch.Tensor, evicted: int) -> None: ...


def evict_over(members: list[tuple[Over, torch.Tensor | None]], recent: int, n_sink: int, over: int) -> None:
    """Evict ``over`` slots of each (row, head) of every layer in ``members`` (layer, its eviction scores or None for
    all alike; layers of one shape, each ``over`` slots over its budget), protecting ``n_sink`` sinks and the
    ``recent`` newest tokens, with one set of ops for all of them."""
    layers = [layer for layer, _ in members]
    padded = not all(layer.all_valid for layer in layers)
    stack = _stacked(members)
    positional = all(layer.ranks_are_positions for layer in layers)  # no padding seen: each row saw n_seen tokens
    if stack is not None:  # every layer's slice of one generation, in order: views, no copies
        ranks = stack[2 if positional else 3]
        valid = stack[4] if padded else None
        eff = None if members[0][1] is None else stack[5]
    else:
        ranks = torch.stack([layer.ranks for layer in layers])
        valid = torch.stack([layer.valid for layer in layers]) if padded else None
        eff = None if members[0][1] is None else torch.stack([e for _, e in members])
    if positional and len({layer.n_seen for layer in layers}) == 1:
        first_recent: torch.Tensor | int = layers[0].n_seen - recent
    else:
        n_valid = torch.stack([layer.n_valid for layer in layers])
        first_recent = (n_valid - recent).view(*n_valid.shape, 1, 1)
    victims = few_over_victims(eff, ranks, first_recent, n_sink, valid, over)
    # a padding victim is no eviction: count the real ones (one sync for every layer)
    evicted = (valid.gather(-1, victims).flatten(1).sum(1).tolist() if padded
               else [math.prod(victims.shape[1:])] * len(layers))
    # one op per kind for all layers when their buffers are stacked (already checked when the views came from them)
    if not drop_together(layers, victims, evicted, checked=stack is not None):
        for layer, layer_victims, n in zip(layers, victims.unbind(0), evicted):
            layer.drop_slots(layer_victims, n)


def _stacked(members: list[tuple[Over, torch.Tensor | None]]) -> tuple[torch.Tensor, ...] | None:
    """Every kind's held slots of the members' shared generation (:meth:`Generation.held`) when the members are all
    of its layers, in order, with the same held count, tokens seen and storage flags (what
    :func:`~kvprune.caches.stacked.drop_together` needs), and each one's eviction scores are its score state; else
    None (stack each layer's own)."""
    first = members[0][0]
    gen = first.generation
    if gen is None or len(members) != len(gen.tensors[0]):
        return None
    s, n, flags = first.keys.shape[-2], first.n_seen, (first.ranks_are_positions, first.all_valid)
    for i, (layer, eff) in enumerate(members):
        if (layer.generation is not gen or layer.layer_idx != i or layer.keys.shape[-2] != s or layer.n_seen != n
                or (layer.ranks_are_positions, layer.all_valid) != flags
                or (eff is not None and eff is not layer.scores)):
            return None
    return gen.held(s)


class DeferredEvictions:
    """The decode evictions of a cache's ``n_layers`` layers, each a few slots over its budget, held until every
    layer has finished its step.

    A layer hands over its eviction scores (:meth:`defer`); when every layer has, the victims are chosen
    together (layers of one shape, window, sink count and excess at once) and each layer drops its own. A forward
    that ends early leaves some due: the next ``update`` of any layer (or a row selection) flushes them first.
    """

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.due: list[tuple[Over, torch.Tensor | None, int, int, int]] = []

    def defer(self, layer: Over, eff: torch.Tensor | None, recent: int, n_sink: int, over: int) -> None:
        """Evict ``over`` slots of each (row, head) of ``layer`` by ``eff``, protecting ``recent`` newest and
        ``n_sink`` first tokens."""
        self.due.append((layer, eff, recent, n_sink, over))
        if len(self.due) >= self.n_layers:
            self.flush()

    def discard(self, layer: Over) -> None:
        self.due = [d for d in self.due if d[0] is not layer]

    def flush(self) -> None:
        due, self.due = self.due, []
        groups: dict[tuple, list[tuple[Over, torch.Tensor | None]]] = {}
        for layer, eff, recent, n_sink, over in due:
            key = (layer.keys.shape[:3], layer.keys.device, eff is None, recent, n_sink, over)
            groups.setdefault(key, []).append((layer, eff))
        for (*_, recent, n_sink, over), members in groups.items():
            evict_over(members, recent, n_sink, over)
