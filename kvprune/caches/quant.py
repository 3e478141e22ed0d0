"""MSB + LSB integer storage for SpAtten's progressive quantization.

A vector (one token's key or value in one head) is quantized linearly over its own range to
``msb + lsb`` bits: ``q = round((x - lo) / scale)``, ``scale = (max - min) / (2**bits - 1)``. The
high ``msb`` bits and the low ``lsb`` bits are stored apart (LSBs of <= 4 bits two per byte), so
a first pass reads only the MSBs; the LSBs are fetched only for rows that need them.
Error bounds per element: ``scale / 2`` with both parts, ``scale * 2**lsb / 2`` with MSBs alone
(MSB-only values are read at the middle of their LSB range). A part of 0 bits is stored empty, so
``quantize(x, 8, 0)`` is plain 8-bit storage and ``quantize(x, 0, 4)`` 4-bit storage packed two per
byte (the quantized KV storage of every method, :mod:`.quantized`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch


@dataclass
class QTensor:
    """Quantized ``[B, H, N, D]``: ``msb``/``lsb`` uint8 parts and per-vector ``lo``/``scale`` (float32)."""

    msb: torch.Tensor
    lsb: torch.Tensor
    lo: torch.Tensor
    scale: torch.Tensor
    msb_bits: int
    lsb_bits: int
    dim: int

    @property
    def packed(self) -> bool:
        return self.lsb_bits <= 4

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QTensor:
        """Apply ``fn`` to every stored tensor (all share the leading ``[B, H, N]`` dims)."""
        return QTensor(fn(self.msb), fn(self.lsb), fn(self.lo), fn(self.scale), self.msb_bits, self.lsb_bits, self.dim)

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    @property
    def device(self) -> torch.device:
        return self.msb.device

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.msb.shape[:-1], self.dim))

    def msb_bytes_per_vector(self) -> float:
        return self.dim * self.msb_bits / 8

    def lsb_bytes_per_vector(self) -> float:
        return self.dim * self.lsb_bits / 8


def _pack(lsb: torch.Tensor) -> torch.Tensor:
    if lsb.shape[-1] % 2:
        lsb = torch.nn.functional.pad(lsb, (0, 1))
    return lsb[..., 0::2] | (lsb[..., 1::2] << 4)


def _unpack(packed: torch.Tensor, dim: int) -> torch.Tensor:
    out = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    return out[..., :dim]


def quantize(x: torch.Tensor, msb_bits: int, lsb_bits: int) -> QTensor:
    """Quantize ``x [B, H, N, D]`` per vector to ``msb_bits + lsb_bits`` bits, split into MSB and LSB parts."""
    levels = 2 ** (msb_bits + lsb_bits) - 1
    xf = x.float()
    lo = xf.amin(-1, keepdim=True)
    hi = xf.amax(-1, keepdim=True)
    scale = ((hi - lo) / levels).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((xf - lo) / scale).clamp(0, levels).to(torch.int32)
    msb = (q >> lsb_bits).to(torch.uint8) if msb_bits else q.new_empty((*q.shape[:-1], 0), dtype=torch.uint8)
    lsb = (q & (2**lsb_bits - 1)).to(torch.uint8)
    if lsb_bits == 0:
        lsb = lsb[..., :0]
    elif lsb_bits <= 4:
        lsb = _pack(lsb)
    return QTensor(msb, lsb, lo, scale, msb_bits, lsb_bits, x.shape[-1])


def levels(t: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The integer levels ``q`` of both parts, as ``dtype`` (``x ~ lo + q * scale``); a 0-bit part reads as 0."""
    if t.lsb_bits == 0:
        return t.msb.to(dtype)
    lsb = _unpack(t.lsb, t.dim) if t.packed else t.lsb
    if t.msb_bits == 0:
        return lsb.to(dtype)
    return ((t.msb.to(torch.int32) << t.lsb_bits) + lsb.to(torch.int32)).to(dtype)


def dequantize(t: QTensor, dtype: torch.dtype, full: bool) -> torch.Tensor:
    """Values from both parts (``full``) or from the MSBs alone (middle of the LSB range)."""
    if full:
        q = levels(t)
    else:
        q = (t.msb.to(torch.int32) << t.lsb_bits).float() + (2**t.lsb_bits - 1) / 2
    return (t.lo + q * t.scale).to(dtype)


def cat(a: QTensor, b: QTensor, dim: int = -2) -> QTensor:
    """Concatenate along the token dimension (``dim`` counts over the leading ``[B, H, N]`` dims)."""
    return QTensor(*(torch.cat([x, y], dim=dim) for x, y in zip(a.tensors(), b.tensors())), a.msb_bits, a.lsb_bits, a.dim)
