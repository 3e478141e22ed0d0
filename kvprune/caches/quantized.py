"""Quantized KV storage for every eviction policy: a :class:`PruningLayer` whose keys and values are packed integers.

Each vector (one token's key or value in one KV head) is quantized over its own range
(:func:`kvprune.caches.quant.quantize`: scale and offset per vector, 8 bits one per byte, 4 bits two per
byte) and stored as one byte *record* per slot: ``[levels | offset (float32) | scale (float32)]``. The
records are ordinary ``[B, H, slots, R]`` uint8 tensors, so everything the float layer does to slots --
appends into free room, eviction (gather of kept slots), beams and batch edits (row selection), byte
accounting -- runs on them unchanged, and ``kv_bytes`` is the packed size, scale and offset included.

What attention reads: the tokens of the current forward in float (they are at hand), every older slot
dequantized. A one-token step (decode) runs :attr:`QuantizedLayer.attention` (set by the factory,
``kvprune.integrations.quantized``), which reads the records block by block without a float copy of the
cache; a multi-token forward (a prompt, a question, a chunk) gets a transient float copy of the held slots
and runs the shared attention path (every backend, mask and observation), like a float layer.
What policies read: the new tokens' float keys for scores fixed at write time (K-norm), the dequantized keys
for rules over the whole cache (KeyDiff's anchor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig

from ..errors import CacheUsageError, InvalidParameterError
from ..policies import Policy
from .budget import Budget
from .cache import PruningCache
from .contract import OwnAttention, bind
from .layer import PruningLayer
from .quant import QTensor, levels, quantize

#: the bit widths a quantized store takes (per vector: keys and values may differ)
KV_BITS: tuple[int, ...] = (8, 4)
#: the float32 offset and scale that close every record
_RANGE_BYTES = 8


def parse_kv_bits(kv_bits: object) -> tuple[int, int] | None:
    """``kv_bits`` as ``(key_bits, value_bits)``, or None for float storage; a typed error naming the valid values."""
    if kv_bits is None:
        return None
    pair = tuple(kv_bits) if isinstance(kv_bits, (tuple, list)) else (kv_bits, kv_bits)
    if len(pair) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b not in KV_BITS for b in pair):
        raise InvalidParameterError(
            f"kv_bits is one of {', '.join(map(str, KV_BITS))} (bits per stored element, keys and values alike), a "
            f"(key_bits, value_bits) pair of them, or None for float storage; got {kv_bits!r}"
        )
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class Codec:
    """How one ``bits``-bit vector of ``dim`` elements is laid out in a byte record (width divisible by 4, so the
    offset and scale are read in place as float32)."""

    bits: int
    dim: int

    @property
    def parts(self) -> tuple[int, int]:
        """``(msb_bits, lsb_bits)`` of :func:`quantize`: 8 bits one per byte, 4 bits packed two per byte."""
        return (8, 0) if self.bits == 8 else (0, self.bits)

    @property
    def level_bytes(self) -> int:
        return self.dim if self.bits == 8 else (self.dim + 1) // 2

    @property
    def width(self) -> int:
        """Record bytes per vector: the levels (padded to 4 bytes) plus offset and scale."""
        return -(-self.level_bytes // 4) * 4 + _RANGE_BYTES

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, H, N, dim]`` as records ``[B, H, N, width]`` uint8."""
        t = quantize(x, *self.parts)
        rec = x.new_zeros((*x.shape[:-1], self.width), dtype=torch.uint8)
        rec[..., : self.level_bytes] = t.msb if self.bits == 8 else t.lsb
        rec[..., -_RANGE_BYTES:] = torch.cat([t.lo, t.scale], dim=-1).view(torch.uint8)
        return rec

    def view(self, rec: torch.Tensor) -> QTensor:
        """The :class:`QTensor` of records ``[B, H, N, width]`` (views, no copy)."""
        ranges = rec[..., -_RANGE_BYTES:].view(torch.float32)  # [B, H, N, 2]: offset, scale
        codes = rec[..., : self.level_bytes]
        empty = codes[..., :0]
        msb, lsb = (codes, empty) if self.bits == 8 else (empty, codes)
        return QTensor(msb, lsb, ranges[..., :1], ranges[..., 1:], *self.parts, self.dim)

    def decode(self, rec: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Records ``[B, H, N, width]`` as ``[B, H, N, dim]`` of ``dtype``: ``offset + level * scale``."""
        t = self.view(rec)
        return (t.lo + levels(t) * t.scale).to(dtype)

    def step(self, rec: torch.Tensor) -> torch.Tensor:
        """The quantization step (``scale``) of each record, ``[B, H, N]``: the element error is at most half of it."""
        return self.view(rec).scale[..., 0]


class QuantizedLayer(PruningLayer):
    """A :class:`PruningLayer` that holds its keys and values as packed records (:class:`Codec`)."""

    def __init__(self, layer_idx: int, policy: Policy, budget: Budget | None, bits: tuple[int, int]) -> None:
        self.bits = bits
        #: decode-step attention over the records (``kvprune.integrations.quantized``); None: every forward reads
        #: a float copy through the shared path (correct, but a full dequantization per step)
        self.attention: OwnAttention | None = None
        super().__init__(layer_idx, policy, budget)

    def reset(self) -> None:
        super().reset()
        self.codecs: tuple[Codec, Codec] | None = None
        self.float_dtype: torch.dtype | None = None
        #: the float keys and values of the forward in flight (its tokens are the last ``pending`` slots)
        self.fresh: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def own_attention(self) -> OwnAttention | None:  # type: ignore[override]
        """The block-wise decode attention at a one-token step; multi-token forwards take the shared path."""
        return self.attention if self.pending == 1 else None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens as records; return what attention reads (records at a one-token step with the
        block-wise attention attached, else float keys/values: older slots dequantized, the new ones as given)."""
        if self.codecs is None:
            self.codecs = (Codec(self.bits[0], key_states.shape[-1]), Codec(self.bits[1], value_states.shape[-1]))
            self.float_dtype = key_states.dtype
        elif (key_states.shape[-1], value_states.shape[-1]) != (self.codecs[0].dim, self.codecs[1].dim) or (
            key_states.dtype != self.float_dtype or value_states.dtype != self.float_dtype
        ):
            raise CacheUsageError(
                f"layer {self.layer_idx} holds {self.float_dtype} keys/values of head size {self.codecs[0].dim}/"
                f"{self.codecs[1].dim} (quantized) but got {key_states.dtype} of {key_states.shape[-1]}/"
                f"{value_states.shape[-1]}: this cache belongs to another model; use one cache per model and conversation"
            )
        kc, vc = self.codecs
        keys, values = super().update(kc.encode(key_states), vc.encode(value_states), *args, **kwargs)
        self.fresh = (key_states, value_states)
        q = key_states.shape[-2]
        if q == 1 and self.attention is not None:
            return keys, values
        return bind(self.float_keys(), self), self.float_values()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = self.float_dtype  # what the layer serves; its storage is uint8 records

    def _float(self, rec: torch.Tensor, codec: Codec, fresh: torch.Tensor | None) -> torch.Tensor:
        n = rec.shape[-2] - (self.pending if fresh is not None else 0)
        old = codec.decode(rec[:, :, :n], self.float_dtype)
        return old if fresh is None or self.pending == 0 else torch.cat([old, fresh], dim=-2)

    def float_keys(self) -> torch.Tensor:
        """Every held key in float ``[B, H, S, D]``: the forward's own tokens as given, older ones dequantized."""
        return self._float(self.keys, self.codecs[0], None if self.fresh is None else self.fresh[0])

    def float_values(self) -> torch.Tensor:
        return self._float(self.values, self.codecs[1], None if self.fresh is None else self.fresh[1])

    def policy_keys(self, new: int = 0) -> torch.Tensor:
        """Float keys for the policy: the ``new`` newest (as given) or, with 0, every held key (dequantized)."""
        if new:
            return self.fresh[0][..., -new:, :]
        return self.float_keys()

    def finish(self, obs: torch.Tensor | None) -> None:
        super().finish(obs)
        self.fresh = None

    def quantization_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key_step, value_step)`` ``[B, H, S]``: each held vector's quantization step (errors are at most half)."""
        return self.codecs[0].step(self.keys), self.codecs[1].step(self.values)


class QuantizedPruningCache(PruningCache):
    """A :class:`PruningCache` whose layers store keys/values in ``kv_bits`` (8 or 4; a ``(key, value)`` pair)."""

    def __init__(
        self,
        policy: str | Policy = "full",
        budget: int | float | Budget | None = None,
        *,
        kv_bits: int | tuple[int, int] = 8,
        config: PretrainedConfig | None = None,
        num_layers: int | None = None,
        prefill_only: bool = False,
        evict_every: int = 1,
        **policy_params: Any,
    ) -> None:
        bits = parse_kv_bits(kv_bits)
        if bits is None:
            raise InvalidParameterError("QuantizedPruningCache needs kv_bits (8 or 4); use PruningCache for float storage")
        self.kv_bits = bits
        super().__init__(policy, budget, config=config, num_layers=num_layers, prefill_only=prefill_only,
                         evict_every=evict_every, **policy_params)

    def make_layer(self, layer_idx: int) -> QuantizedLayer:
        return QuantizedLayer(layer_idx, self.policy, self.budget, self.kv_bits)

    def attach_attention(self, attention: OwnAttention) -> None:
        """Give every layer the decode-step attention that reads its records (done by ``make_cache``)."""
        for layer in self.layers:
            layer.attention = attention

    def __repr__(self) -> str:
        return super().__repr__().replace("PruningCache(", f"QuantizedPruningCache(kv_bits={self.kv_bits}, ", 1)
