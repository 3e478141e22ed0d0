"""KVzip's cache: a pruning cache that waits for the context replay before it evicts.

Stages of each layer: ``"context"`` (the first forward is stored whole, nothing scored or evicted),
``"replay"`` (the replay forwards of :mod:`kvprune.integrations.kvzip` append their tokens, fold the largest
attention each context slot receives into its score, then :meth:`KVzipLayer.drop_replay` discards them),
``"done"`` (the context has been evicted to the budget; later tokens are appended with an infinite score,
so that with ``prefill_only=False`` the lowest-scored context pairs make room for them -- in their own
head, or with ``scope="global"`` anywhere in the row's cache, decided once per forward after the last
layer -- and with ``prefill_only=True`` the cache grows as a plain cache does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..distributed import parallel_of
from ..errors import InvalidParameterError
from ..policies.base import rank_grid
from ..policies.kvzip import KVzip
from .base import Owner
from .cache import PruningCache
from .layer import PruningLayer
from .slots import INDEX_DTYPE

STAGES: tuple[str, ...] = ("context", "replay", "done")


class KVzipLayer(PruningLayer):
    """A pruning layer whose scores are the replay's maxima (KVzip Eq. 2), evicted once the replay is over."""

    def reset(self) -> None:
        super().reset()
        self.stage = "context"
        self.own_attention = None  # set by the replay driver while a replay forward runs
        self.replay: Any = None  # what the driver tells the replay attention about the current chunk
        self._context: tuple[int, int, torch.Tensor, bool] | None = None
        if not hasattr(self, "evicts_for"):
            #: the cache whose global eviction runs after this layer (the last; set by the cache, an Owner), or None
            self.evicts_for: Owner | None = None

    # -- replay bookkeeping --------------------------------------------------------------------
    def begin_replay(self) -> None:
        """Remember the context's extent (slots, tokens seen, per-row counts) before replay tokens are appended."""
        self.stage = "replay"
        self._context = (self.keys.shape[-2], self.n_seen, self.n_valid.clone(), self.all_valid)

    def drop_replay(self) -> None:
        """Discard the replay's keys and values: hold exactly the context slots again (their scores kept)."""
        assert self._context is not None
        slots, n_seen, n_valid, all_valid = self._context
        if self.keys.shape[-2] != slots:
            b, h = self.keys.shape[:2]
            self._adopt(torch.arange(slots, device=self.device, dtype=INDEX_DTYPE).expand(b, h, slots))
        self.n_seen, self.n_valid, self.all_valid = n_seen, n_valid.clone(), all_valid
        self.pending = 0

    def fold(self, obs: torch.Tensor) -> None:
        """``S <- max(S, obs)`` on the context slots (the replay's own slots are dropped afterwards)."""
        slots = self._context[0] if self._context is not None else self.keys.shape[-2]
        ctx = self.scores[..., :slots]
        ctx.copy_(torch.maximum(ctx, obs[..., :slots].to(ctx.dtype)))

    # -- the attention contract ----------------------------------------------------------------
    def observe_padding(self, new_valid: torch.Tensor | None) -> None:
        q = self.pending
        super().observe_padding(new_valid)
        if self.stage == "done":  # tokens after the context: kept before any context pair
            self.scores[..., -q:] = float("inf")

    def finish(self, obs: torch.Tensor | None) -> None:
        if self.stage == "replay":
            if obs is not None:
                self.fold(obs)
            self.pending = 0
            return
        if self.stage == "context" or self.frozen:  # the context waits for its replay; frozen: prefill_only
            self.pending = 0
            return
        self.pending = 0
        if self.evicts:
            if self.policy.scope == "head":
                self.evict()
            elif self.evicts_for is not None:  # global: once per forward, when the last layer is done
                cache = self.evicts_for()  # the cache, weakly (no reference cycle)
                if cache is not None:
                    cache._evict_global()

    def keep_mask(self, mask: torch.Tensor) -> None:
        """Hold the slots where ``mask [B, H, S]`` is true: as many slots as the fullest (row, head) needs, the
        others' surplus slots masked as padding (the global allocation keeps a different count per head)."""
        width = max(1, int(mask.sum(-1).max()))
        order = (~mask).to(torch.int8).argsort(dim=-1, stable=True)[..., :width]  # selected first, in slot order
        keep = order.sort(dim=-1).values
        chosen = mask.gather(-1, keep)
        before = int(self.valid.sum())
        self._adopt(keep)
        self.valid &= chosen
        after = int(self.valid.sum())
        self.evictions += before - after
        self.all_valid = after == self.valid.numel()
        self.heads_aligned = bool((self.positions == self.positions[:, :1]).all()) and self.all_valid


class KVzipCache(PruningCache):
    """A :class:`PruningCache` for :class:`~kvprune.policies.kvzip.KVzip`: compressed once its replay has scored
    the context (build it with ``kvprune.make_cache(model, "kvzip", budget, tokenizer=tok)``)."""

    def __init__(self, policy: str | KVzip = "kvzip", budget: Any = None, *, prefill_only: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(policy, budget, prefill_only=prefill_only, **kwargs)
        if not isinstance(self.policy, KVzip):
            raise InvalidParameterError(f"KVzipCache runs the kvzip policy; got {self.policy.name!r}")
        if self.policy.scope == "global":  # after the context, the last layer's finish evicts across every layer
            self.layers[-1].evicts_for = Owner(self)
        self.tokenizer: Any = None  # set by the factory; the replay renders its instruction with it
        self.replay_seconds = 0.0  # wall time of the last replay and eviction (scoring cost)

    def make_layer(self, layer_idx: int) -> KVzipLayer:
        return KVzipLayer(layer_idx, self.policy, self.budget)

    @property
    def stage(self) -> str:
        """``"context"`` until the first forward has been replayed and evicted, then ``"done"``."""
        return self.layers[0].stage

    def compress(self) -> None:
        """Evict the scored context to the budget (uniform per head, or one budget across heads and layers)."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        if self.policy.scope == "global" and layers:
            self._evict_global(layers)
        else:
            for layer in layers:
                layer.evict()
        for layer in self.layers:
            layer.stage, layer._context, layer.replay = "done", None, None
            layer.frozen = self.prefill_only

    def _evict_global(self, layers: list[KVzipLayer] | None = None) -> None:
        """Per row, keep the ``cap x heads x layers`` highest scores over every head and layer (sinks and the
        newest token always; tokens after the context score infinity); on a tie the earlier layer, head and slot win."""
        layers = [layer for layer in self.layers if layer.is_initialized] if layers is None else layers
        caps = layers[0].capacity()
        if caps is None:
            return
        parallel = parallel_of(self)  # tensor parallel: rank every rank's heads alike (one all-gather per layer)
        # nothing over the budget: no eviction (decided on the whole group's count, so every rank decides alike)
        held = parallel.all_reduce_sum(sum(layer.valid.sum(dim=(1, 2)) for layer in layers))  # [B]
        if bool((held <= caps * parallel.size * sum(layer.valid.shape[1] for layer in layers)).all()):
            return
        effs = [rank_grid(lay.scores).masked_fill(lay.protected(caps), float("inf")).masked_fill(~lay.valid, float("-inf"))
                for lay in layers]
        local = layers[0].scores.shape[1]
        if parallel.active:  # ranks may hold different slot counts per layer (after a global eviction): pad with -inf
            widths = parallel.gather_heads(torch.tensor([[e.shape[-1] for e in effs]], device=effs[0].device), dim=0)
            effs = [F.pad(e, (0, int(w) - e.shape[-1]), value=float("-inf")) for e, w in zip(effs, widths.amax(0))]
        effs = [parallel.gather_heads(e, dim=1) for e in effs]
        flat = torch.cat([e.flatten(1) for e in effs], dim=1)
        total = caps * sum(e.shape[1] for e in effs)  # [B]: the same mean budget per head and layer
        order = flat.sort(dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
        chosen = rank < total[:, None]
        start = 0
        for lay, e in zip(layers, effs):
            n = e[0].numel()
            mask = chosen[:, start : start + n].view_as(e)
            # this rank's heads, its own slots
            mask = mask.narrow(1, parallel.head_offset(local), local)[..., : lay.valid.shape[-1]] & lay.valid
            start += n
            lay.keep_mask(mask)

    def __repr__(self) -> str:
        return "KVzip" + super().__repr__()
