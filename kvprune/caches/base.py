"""What every kvprune cache and cache layer shares: transformers' flags, no rollback, row selection (beams),
one growth-buffer rule, the layout check, and one stats shape.

A layer holds ``[B, H, slots, ...]`` keys and values and answers :class:`KVLayer`'s few questions
(``select_rows``, ``kept``, ``kv_bytes``, ``physical_length``, ``evicted``); :class:`KVCache` builds
:class:`CacheStats` from those answers the same way for every method.
"""

from __future__ import annotations

import weakref

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import CacheUsageError, InvalidParameterError, UnsupportedGenerationModeError
from ..distributed import SINGLE, TensorParallel, parallel_of, total_stats
from .accounting import held_bytes

#: a full buffer grows by max(GROWTH_MIN, held // GROWTH_DIV) free slots (amortised appends, <= 1/8 slack)
GROWTH_MIN, GROWTH_DIV = 16, 8


def room(needed: int) -> int:
    """Entries a buffer gets when it must hold ``needed``: the one growth rule of every cache buffer
    (appends are amortised; the slack is at most 1/8 beyond GROWTH_MIN)."""
    return needed + max(GROWTH_MIN, needed // GROWTH_DIV)


def grown(t: torch.Tensor, used: int, size: int, dim: int, fill: Any = None) -> torch.Tensor:
    """A new buffer like ``t`` of ``size`` entries along ``dim`` holding ``t``'s first ``used`` entries at its
    front; the free part is filled with ``fill`` (left unset if None)."""
    shape = list(t.shape)
    shape[dim] = size
    buf = t.new_empty(shape)
    if used:
        buf.narrow(dim, 0, used).copy_(t.narrow(dim, 0, used))
    if fill is not None:
        buf.narrow(dim, used, shape[dim] - used).fill_(fill)
    return buf


def check_layout(layer_idx: int, held_keys: torch.Tensor, held_values: torch.Tensor, key_states: torch.Tensor,
                 value_states: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Refuse new keys/values whose head size, dtype or device differs from what the layer holds (another model).

    ``dtype``: the float type the layer stores in, when its tensors hold packed parts instead (quantized storage).
    """
    if key_states.shape[-1] != held_keys.shape[-1] or value_states.shape[-1] != held_values.shape[-1]:
        raise CacheUsageError(
            f"layer {layer_idx} holds keys/values of head size {held_keys.shape[-1]}/{held_values.shape[-1]} but got "
            f"{key_states.shape[-1]}/{value_states.shape[-1]}: this cache belongs to another model; use one cache per "
            "model and conversation (kvprune.make_cache(model, ...))"
        )
    dtype = held_keys.dtype if dtype is None else dtype
    if key_states.dtype != dtype or key_states.device != held_keys.device:
        raise CacheUsageError(
            f"layer {layer_idx} holds {dtype} keys on {held_keys.device} but got {key_states.dtype} on "
            f"{key_states.device}; use one cache per model and conversation"
        )


def check_row_index(index: object, batch: int) -> torch.Tensor:
    """``index`` as a 1-D int64 tensor of rows in ``[0, batch)`` (beam reordering, batch selection), else a typed error."""
    t = torch.as_tensor(index)
    if t.dim() != 1 or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise InvalidParameterError(f"row indices must be a 1-D integer tensor; got shape {tuple(t.shape)} of {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= batch):
        raise InvalidParameterError(
            f"row indices must be in [0, {batch}) for a cache holding {batch} rows; got min {int(t.min())}, max {int(t.max())}"
        )
    return t.long()


class Owner:
    """A layer's reference to the cache that holds it: weak, so the two form no reference cycle and a dropped cache
    frees its memory at once; a deep copy of the cache re-points the copied layer's at the copied cache."""

    def __init__(self, cache: object) -> None:
        self._ref = weakref.ref(cache)

    def __call__(self) -> Any:
        """The cache (None once it is gone)."""
        return self._ref()

    def __deepcopy__(self, memo: dict) -> "Owner":
        cache = self._ref()
        return Owner(memo.get(id(cache), cache))


@dataclass
class CacheStats:
    """What a cache holds: kept tokens per layer and (row, KV head), evictions and bytes (every method alike)."""

    tokens_seen: int
    kept: list[torch.Tensor]  # per layer: [batch, kv_heads] valid tokens held
    slots: list[int]  # per layer: physical slots per (row, KV head)
    evictions: list[int]  # per layer: tokens evicted (or pruned away), summed over rows and heads
    kv_bytes: int  # keys and values held (packed parts when quantized)
    metadata_bytes: int  # every other tensor byte the cache keeps alive; kv_bytes + metadata_bytes is all of it
    #: the method's own counters (LazyLLM: computations done; SpAtten: compute, heads, bytes read), else empty
    method: dict[str, Any] = field(default_factory=dict)


class KVLayer(CacheLayerMixin):
    """A kvprune cache layer: shape-changing, so not compileable or croppable; rows follow beams and batch edits."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False
    #: named in the error a rollback raises
    METHOD: ClassVar[str] = "pruning"
    #: why the cache cannot be rolled back, in that error
    ROLLBACK: ClassVar[str] = "evicted tokens are gone"
    #: the tensor-parallel group the layer's model is sharded over (set by ``make_cache``; one process by default)
    parallel: TensorParallel = SINGLE

    # -- transformers' layer contract ----------------------------------------------------------
    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # the same contract's name in transformers < 5.3

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedGenerationModeError(
            f"a {self.METHOD} cache cannot be rolled back ({self.ROLLBACK}), so assisted/speculative decoding and "
            "prompt-lookup decoding are not supported; use greedy, sampling or beam search"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.select_rows(check_row_index(beam_idx, self.rows()))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.select_rows(torch.arange(self.rows()).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.select_rows(check_row_index(indices, self.rows()))

    # -- what the layer answers --------------------------------------------------------------
    def rows(self) -> int:
        """Rows (batch entries) held."""
        return self.keys.shape[0]

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (a checked 1-D int64 tensor), in that order."""
        raise NotImplementedError

    def kept(self) -> torch.Tensor:
        """``[B, Hkv]`` valid tokens held per (row, KV head)."""
        raise NotImplementedError

    def evicted(self) -> int:
        """Tokens evicted (or pruned away) so far, summed over rows and heads."""
        return 0

    @property
    def physical_length(self) -> int:
        """Slots held per (row, KV head)."""
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def kv_bytes(self) -> int:
        """Bytes of keys and values held (their storage as held: packed parts when quantized)."""
        return 0 if not self.is_initialized else self.keys.nbytes + self.values.nbytes


class KVCache(Cache):
    """A kvprune cache: evicted or pruned tokens cannot be rolled back; one :meth:`stats` for every method."""

    #: evicted tokens cannot be rolled back: ``generate`` refuses assisted/prompt-lookup decoding up front
    refuses_rollback = True
    #: the tensor-parallel group the model is sharded over (set by ``make_cache``; one process by default)
    parallel: TensorParallel = SINGLE

    def crop(self, *args: Any, **kwargs: Any) -> None:
        self.layers[0].crop(0)  # raises UnsupportedGenerationModeError

    @property
    def is_compileable(self) -> bool:
        return False

    def method_stats(self) -> dict[str, Any]:
        """The method's own counters for :attr:`CacheStats.method` (none by default)."""
        return {}

    def stats(self, total: bool = False) -> CacheStats:
        """What the cache holds now; K/V bytes plus metadata bytes is every tensor byte it keeps alive.

        On a tensor-parallel model this is what this rank holds (its own KV heads); ``total=True`` sums it over
        the ranks (``kept`` then lists every KV head, in global order). That is a collective: every rank must call it.
        """
        layers = [layer for layer in self.layers if layer.is_initialized]
        kv = sum(layer.kv_bytes() for layer in layers)
        if total:
            return total_stats(self.stats(), parallel_of(self), getattr(self, "EVICTIONS_PER_TOKEN", False))
        return CacheStats(
            tokens_seen=self.get_seq_length(),
            kept=[layer.kept().cpu() for layer in layers],
            slots=[layer.physical_length for layer in layers],
            evictions=[layer.evicted() for layer in layers],
            kv_bytes=kv,
            metadata_bytes=held_bytes(self) - kv,  # positions, validity, scores, per-token state, free room
            method=self.method_stats(),
        )
