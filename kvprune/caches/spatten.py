"""SpAtten's cache: per-layer KV of the tokens and heads still present there, plus the cascade state.

Each token has a depth (the number of layers that hold its KV) that only shrinks: a token pruned
after layer ``l`` leaves every later layer, now and at all later steps. Each query head has a depth
too; a KV head's storage is dropped from a layer once every head of its query group (in every row)
has stopped before it. Keys and values are stored in float, or as MSB + LSB parts
(:mod:`.quant`) when progressive quantization is on. The SpAtten forward and attention function
in :mod:`kvprune.integrations.spatten` drive it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..distributed import SINGLE, TensorParallel
from ..errors import BatchMismatchError
from ..policies.random import hash_uniform
from ..policies.spatten import SpAtten
from .base import Owner, check_layout
from .contract import StepContext, bind
from .stepwise import StepwiseCache, StepwiseLayer
from .quant import QTensor, cat, dequantize, quantize

Stored = torch.Tensor | QTensor


def _cat(a: Stored, b: Stored) -> Stored:
    return cat(a, b) if isinstance(a, QTensor) else torch.cat([a, b], dim=-2)


def _map(t: Stored, fn) -> Stored:
    return t.map(fn) if isinstance(t, QTensor) else fn(t)


def _write_slot(t: Stored, rows: torch.Tensor, slots: torch.Tensor, new: Stored) -> None:
    """``t[b, :, slots[b]] = new[b, :, 0]`` for every row, in place."""
    pairs = zip(t.tensors(), new.tensors()) if isinstance(t, QTensor) else [(t, new)]
    for dst, src in pairs:
        dst[rows, :, slots] = src[:, :, 0]


@dataclass
class SpAttenCounters:
    """What SpAtten saved so far (all steps, all layers), summed over rows."""

    qk_products: int = 0  # query-key dot products done (per query head)
    qk_products_full: int = 0  # the same without any token or head pruning
    rows: int = 0  # attention rows (query, head) computed
    rows_refetched: int = 0  # rows recomputed with the LSBs
    bytes_read: float = 0.0  # K/V bytes read by the attention (MSB, LSB refetches, or float)
    bytes_read_full: float = 0.0  # K/V bytes a float cache without any pruning would read (per query head)
    per_layer_tokens: list[int] = field(default_factory=list)


class SpAttenLayer(StepwiseLayer):
    """KV of the tokens (and KV heads) present at one layer; slots are unordered, masks come from positions."""

    METHOD = "SpAtten"

    def __init__(self, layer_idx: int, cache: SpAttenCache) -> None:
        super().__init__()
        # weak: the cache holds its layers, so a strong reference back would keep a dropped cache's memory until
        # the garbage collector runs
        self.layer_idx, self._cache = layer_idx, Owner(cache)
        self.reset()

    @property
    def cache(self) -> SpAttenCache:
        """The cache this layer belongs to (its policy, counters and head state)."""
        cache = self._cache()
        assert cache is not None, "a SpAtten layer outlived its cache"
        return cache

    def reset(self) -> None:
        self.keys: Stored | None = None
        self.values: Stored | None = None
        self.kv_heads: torch.Tensor | None = None  # global indices of the KV heads stored here
        self.positions: torch.Tensor | None = None  # [B, N] token index per slot (-1: empty)
        self.valid: torch.Tensor | None = None  # [B, N]
        self.pending = 0
        self.step: StepContext | None = None
        self.is_initialized = False

    # -- the attention function's contract (kvprune.caches.contract): SpAtten computes its own attention
    frozen = True  # nothing for the shared path to observe: the cascade's scores are SpAtten's own

    @property
    def policy(self) -> SpAtten:
        return self.cache.policy

    @property
    def own_attention(self):
        """SpAtten's attention over the present heads and stored parts (set on the cache by its factory)."""
        return self.cache.layer_attention

    def finish(self, obs: None) -> None:
        self.pending = 0

    # -- called by the SpAtten forward before the layer runs -----------------------------------------
    def begin(self, step: StepContext) -> None:
        """This step's queries (token indices, -1 for padding); drop the slots and KV heads pruned since."""
        self.step = step
        if not self.is_initialized:
            return
        depth = self.cache.depth.gather(1, self.positions.clamp(min=0))
        self.valid &= depth > self.layer_idx
        alive = self.cache.kv_heads_alive(self.layer_idx)
        keep = alive[self.kv_heads]
        if not bool(keep.all()):
            idx = torch.nonzero(keep).flatten()
            self.kv_heads = self.kv_heads[idx]
            self.keys = _map(self.keys, lambda t: t.index_select(1, idx))
            self.values = _map(self.values, lambda t: t.index_select(1, idx))
        self.compact()

    def take_slots(self, order: torch.Tensor) -> None:
        self.keys = _map(self.keys, lambda t: self.gather_slots(t, order))
        self.values = _map(self.values, lambda t: self.gather_slots(t, order))

    # -- transformers' layer contract ------------------------------------------------------------
    def _store(self, states: torch.Tensor, is_key: bool) -> Stored:
        bits = self.cache.policy.quant_bits
        if bits is None or not (is_key or self.cache.policy.quantize_values):
            return states
        return quantize(states, *bits)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.cache.head_dim is None:
            self.cache.head_dim = (key_states.shape[-1], value_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        # a tensor-parallel rank holds KV heads kv_start..: kv_heads stay global, the incoming states are local
        self.kv_start, stop = self.cache.parallel.local_range(self.cache.num_kv_heads)
        alive = self.cache.kv_heads_alive(self.layer_idx)[self.kv_start : stop]
        self.kv_heads = (self.kv_start + torch.nonzero(alive).flatten()).to(self.device)
        self.positions = torch.empty((key_states.shape[0], 0), dtype=torch.long, device=self.device)
        self.valid = torch.empty((key_states.shape[0], 0), dtype=torch.bool, device=self.device)
        self.keys = self._store(key_states[:, self.kv_heads - self.kv_start, :0], True)
        self.values = self._store(value_states[:, self.kv_heads - self.kv_start, :0], False)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        check_layout(self.layer_idx, self.keys, self.values, key_states, value_states, dtype=self.dtype)
        new_k = self._store(key_states.index_select(1, self.kv_heads - self.kv_start), True)
        new_v = self._store(value_states.index_select(1, self.kv_heads - self.kv_start), False)
        q = key_states.shape[-2]
        free = ~self.valid
        if q == 1 and bool(free.any(-1).all()):  # a decode step: reuse a freed slot in every row
            rows = torch.arange(self.valid.shape[0], device=self.device)
            slot = free.to(torch.int8).argmax(-1)
            _write_slot(self.keys, rows, slot, new_k)
            _write_slot(self.values, rows, slot, new_v)
            self.positions[rows, slot] = self.step.query_positions[:, 0]
            self.valid[rows, slot] = self.step.query_valid[:, 0]
        else:
            self.keys, self.values = _cat(self.keys, new_k), _cat(self.values, new_v)
            self.positions = torch.cat([self.positions, self.step.query_positions], dim=-1)
            self.valid = torch.cat([self.valid, self.step.query_valid], dim=-1)
        self.pending = q
        # the attention function reads the stored parts through this layer; what it gets here is the first pass
        return bind(self.first_pass_keys(), self), self.first_pass_values()

    def first_pass_keys(self) -> torch.Tensor:
        return self.keys if isinstance(self.keys, torch.Tensor) else dequantize(self.keys, self.dtype, full=False)

    def first_pass_values(self) -> torch.Tensor:
        return self.values if isinstance(self.values, torch.Tensor) else dequantize(self.values, self.dtype, full=False)

    def full_keys(self) -> torch.Tensor:
        return self.keys if isinstance(self.keys, torch.Tensor) else dequantize(self.keys, self.dtype, full=True)

    def full_values(self) -> torch.Tensor:
        return self.values if isinstance(self.values, torch.Tensor) else dequantize(self.values, self.dtype, full=True)

    def observe_padding(self, new_valid: torch.Tensor | None) -> None:
        """Validity comes from the SpAtten forward, not from the padding mask."""

    def is_plain_causal(self, n_queries: int, sliding_window: int | None = None) -> bool:
        return False

    def ordered_queries(self) -> None:
        return None

    def attention_allowed(self, n_queries: int, sliding_window: int | None = None) -> torch.Tensor:
        """Present keys at or before each query: ``[B, 1, Q, N]`` (padding queries see only themselves)."""
        kpos = self.positions[:, None, None, :]
        qpos = self.step.query_positions[:, None, :, None]
        allowed = self.valid[:, None, None, :] & (kpos <= qpos)
        if sliding_window is not None:
            allowed &= kpos > qpos - sliding_window
        return allowed | ((kpos == qpos) & (qpos < 0))

    def get_seq_length(self) -> int:
        return self.cache.n_seen

    def select_rows(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            index = index.to(self.device)
            self.positions, self.valid = self.positions.index_select(0, index), self.valid.index_select(0, index)
            self.keys = _map(self.keys, lambda t: t.index_select(0, index))
            self.values = _map(self.values, lambda t: t.index_select(0, index))

    def kv_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.nbytes if isinstance(t, (torch.Tensor, QTensor)) else 0 for t in (self.keys, self.values))

    @property
    def physical_length(self) -> int:
        return 0 if not self.is_initialized else self.valid.shape[1]

    def kept(self) -> torch.Tensor:
        """``[B, Hkv]`` tokens present per row; zero for the KV heads no longer stored here."""
        per_row = self.valid.sum(-1)
        n_kv = self.cache.num_kv_heads // self.cache.parallel.size  # this rank's KV heads (all, in one process)
        heads = torch.zeros((per_row.shape[0], n_kv), dtype=per_row.dtype, device=per_row.device)
        heads[:, self.kv_heads - self.kv_start] = per_row[:, None]
        return heads

    def evicted(self) -> int:
        """Tokens pruned away before this layer (the cascade), summed over rows."""
        c = self.cache
        return int(((c.depth <= self.layer_idx) & c.token_valid).sum())


class SpAttenCache(StepwiseCache):
    """The cache ``model.generate`` carries for SpAtten (build it with ``kvprune.make_cache(model, "spatten")``)."""

    ROW_STATE = ("token_valid", "depth", "score", "head_depth", "head_score")
    #: the tensor-parallel group (kvprune.make_cache attaches the model's): token and head state stay global and
    #: identical on every rank; each rank stores and computes only its own heads
    parallel: TensorParallel = SINGLE
    #: ``stats().evictions`` counts pruned tokens per row, not per KV head (every rank counts the same)
    EVICTIONS_PER_TOKEN = True

    def __init__(self, policy: SpAtten, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        self.policy = policy
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.token_schedule = policy.token_schedule(num_layers)
        self.head_schedule = policy.head_schedule(num_layers)
        super().__init__(layers=[SpAttenLayer(i, self) for i in range(num_layers)])
        self.reset_tokens()

    def reset_tokens(self) -> None:
        self.n_seen = 0
        self.head_dim: tuple[int, int] | None = None  # (key, value) head sizes, set by the first update
        self.token_valid: torch.Tensor | None = None  # [B, T]
        self.depth: torch.Tensor | None = None  # [B, T] layers that hold the token's KV
        self.score: torch.Tensor | None = None  # [B, T] cumulative attention received (float32)
        self.head_depth: torch.Tensor | None = None  # [B, Hq] layers that compute the head
        self.head_score: torch.Tensor | None = None  # [B, Hq] cumulative L1 of the head's output
        self.counters = SpAttenCounters(per_layer_tokens=[0] * len(self.layers))
        self.step_full_pairs = 0  # set by the forward each step: the unpruned (query, key) pairs of a layer

    def reset(self) -> None:
        super().reset()
        self.reset_tokens()

    def append_tokens(self, valid: torch.Tensor) -> None:
        """New tokens start with every layer ahead of them; padding with none."""
        b, q = valid.shape
        if self.token_valid is not None and self.token_valid.shape[0] != b:
            raise BatchMismatchError(f"the cache holds batch {self.token_valid.shape[0]} but got {b}; use one cache per batch")
        n_layers = len(self.layers)
        new = {
            "token_valid": valid,
            "depth": torch.where(valid, n_layers, 0),
            "score": torch.zeros((b, q), dtype=torch.float32, device=valid.device),
        }
        self.append_state(new)
        if self.head_depth is None:
            self.head_depth = torch.full((b, self.num_heads), n_layers, dtype=torch.long, device=valid.device)
            self.head_score = torch.zeros((b, self.num_heads), dtype=torch.float32, device=valid.device)
        self.n_seen += q

    def kv_heads_alive(self, layer_idx: int) -> torch.Tensor:
        """``[Hkv]``: KV heads with a query head (in some row) still computed at ``layer_idx``."""
        group = self.num_heads // self.num_kv_heads
        return (self.head_depth > layer_idx).view(-1, self.num_kv_heads, group).any(-1).any(0)

    def prune_after(self, layer_idx: int) -> None:
        """Cascade pruning after ``layer_idx``: tokens (the newest always kept) and heads that do not go on."""
        if layer_idx >= len(self.layers) - 1:
            return
        nxt = layer_idx + 1
        p = self.token_schedule[layer_idx]
        if p > 0:
            present = self.token_valid & (self.depth > nxt)
            from_end = self.token_valid.flip(-1).cumsum(-1).flip(-1)  # valid tokens at or after each one
            newest = self.token_valid & (from_end <= max(1, self.policy.recent))
            newest[:, -1] = True
            n_keep = torch.maximum(SpAtten.keep_count(self.token_valid.sum(-1), p), (newest & present).sum(-1))
            score = self.score
            if self.policy.importance == "random":  # ablation: one fixed random score per token
                rank = self.token_valid.long().cumsum(-1)
                score = hash_uniform(17, rank)
            keep = self.policy.select(score, present, newest, n_keep)
            self.depth = torch.where(present & ~keep, nxt, self.depth)
        ph = self.head_schedule[layer_idx]
        if ph > 0:
            present = self.head_depth > nxt
            n = torch.full((present.shape[0],), self.num_heads, device=present.device)
            keep = self.policy.select(self.head_score, present, torch.zeros_like(present), SpAtten.keep_count(n, ph))
            self.head_depth = torch.where(present & ~keep, nxt, self.head_depth)

    # -- transformers' cache contract -------------------------------------------------------------
    # -- reporting --------------------------------------------------------------------------------
    def kept_tokens(self) -> list[torch.Tensor]:
        """Per layer, ``[B]`` tokens present (their KV is held there)."""
        return [((self.depth > i) & self.token_valid).sum(-1) for i in range(len(self.layers))]

    def active_heads(self) -> list[torch.Tensor]:
        """Per layer, ``[B, Hq]`` True where the query head is computed."""
        return [self.head_depth > i for i in range(len(self.layers))]

    def spatten_stats(self) -> dict[str, Any]:
        """``stats().method`` without the byte accounting of every tensor."""
        return self.method_stats()

    def method_stats(self) -> dict[str, Any]:
        """Compute saved (attention dot products), memory held, and progressive-quantization traffic."""
        c = self.counters
        layers = [layer for layer in self.layers if layer.is_initialized]
        full_kv = 0
        if layers:
            elem = torch.empty((), dtype=layers[0].dtype).element_size()
            b = self.token_valid.shape[0]
            d_k = layers[0].keys.shape[-1]
            full_kv = 2 * b * (self.num_kv_heads // self.parallel.size) * self.n_seen * d_k * elem * len(self.layers)
        return {
            "tokens_kept_per_layer": [int(k.sum()) for k in self.kept_tokens()],
            "heads_active_per_layer": [int(h.sum()) for h in self.active_heads()],
            "kv_heads_stored_per_layer": [int(layer.kv_heads.numel()) if layer.is_initialized else 0 for layer in self.layers],
            "attention_compute_fraction": c.qk_products / c.qk_products_full if c.qk_products_full else 1.0,
            "kv_bytes": sum(layer.kv_bytes() for layer in layers),
            "kv_bytes_full_float": full_kv,
            "rows": c.rows,
            "rows_refetched": c.rows_refetched,
            "refetch_fraction": c.rows_refetched / c.rows if c.rows else 0.0,
            "bytes_read": c.bytes_read,
            "bytes_read_full_float": c.bytes_read_full,
        }
