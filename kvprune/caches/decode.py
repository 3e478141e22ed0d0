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


def one_over_victims(eff: torch.Tensor, ranks: torch.Tensor, first_recent: torch.Tensor, n_sink: int) -> torch.Tensor:
    """The slot each (…, row, head) drops, ``[..., B, H, 1]``, from scores ``eff [..., B, H, S]`` (higher is kept).

    Protected: the sinks (``ranks < n_sink``) and the recent window (``ranks >= first_recent [..., B, 1, 1]``).
    Among the rest the lowest score on :func:`~kvprune.policies.base.rank_grid` goes, the newest (highest rank)
    among equals: exactly what the stable sort of the general eviction keeps and drops.
    """
    eff = rank_grid(eff)  # a new tensor: filled in place
    eff.masked_fill_((ranks < n_sink) | (ranks >= first_recent), float("inf"))
    low = eff.amin(dim=-1, keepdim=True)
    return torch.where(eff == low, ranks, -1).argmax(dim=-1, keepdim=True)


class OneOver(Protocol):
    """What a layer gives :class:`DeferredEvictions`: its rank of every slot, its token counts, and the drop."""

    ranks: torch.Tensor
    n_valid: torch.Tensor

    def drop_slots(self, victim: torch.Tensor) -> None: ...


class DeferredEvictions:
    """The one-over decode evictions of a cache's ``n_layers`` layers, held until each has finished its step.

    A layer hands over its eviction scores (:meth:`defer`); when every layer has, the victims are chosen
    together (layers of one shape, window and sink count at once) and each layer drops its own. A forward
    that ends early leaves some due: the next ``update`` of any layer (or a row selection) flushes them first.
    """

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.due: list[tuple[OneOver, torch.Tensor, int, int]] = []

    def defer(self, layer: OneOver, eff: torch.Tensor, recent: int, n_sink: int) -> None:
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
            groups.setdefault((tuple(eff.shape), eff.device, recent, n_sink), []).append((layer, eff))
        for (_, _, recent, n_sink), members in groups.items():
            layers = [layer for layer, _ in members]
            if len(members) == 1:
                eff, ranks, n_valid = members[0][1], layers[0].ranks, layers[0].n_valid
            else:
                eff = torch.stack([e for _, e in members])
                ranks = torch.stack([layer.ranks for layer in layers])
                n_valid = torch.stack([layer.n_valid for layer in layers])
            victims = one_over_victims(eff, ranks, (n_valid - recent)[..., None, None], n_sink)
            for layer, victim in zip(layers, victims.unbind(0) if len(members) > 1 else (victims,)):
                layer.drop_slots(victim)
