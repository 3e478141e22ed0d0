"""Decode-step attention over quantized KV records, block by block, without a float copy of the cache.

A record holds a vector's integer levels ``c`` with its offset ``lo`` and scale ``s`` (``x ~ lo + s * c``), so
a query's logits and the output are computed from the levels directly:
``q . k = s_k * (q . c_k) + lo_k * sum(q)`` and ``sum_j p_j v_j = sum_j (p_j s_j) c_j + sum_j p_j lo_j``.
Keys and values are read in blocks of at most ``BLOCK_ELEMENTS`` levels (as float32), so the extra memory of a
step is one block, not the cache. The newest token (this step's) is read in float. The softmax row is the
observation the policy declared (any kind: a one-query forward's rows are all its rows), averaged per KV group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..caches.quant import levels
from ..caches.quantized import QuantizedLayer, QuantizedPruningCache, parse_kv_bits
from ..distributed import parallel_of
from ..errors import InvalidParameterError
from .attention import BLOCK_ELEMENTS, estimate_observation


def _nibbles(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The low and high 4-bit levels of packed bytes, as float32 (the even and the odd elements)."""
    return (packed & 0xF).float(), (packed >> 4).float()


def _block(per_slot: int) -> int:
    """Slots per block: at most ``BLOCK_ELEMENTS`` float32 levels at once."""
    return max(1, BLOCK_ELEMENTS // max(1, per_slot))


def quantized_decode_attention(
    layer: QuantizedLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str, scaling: float,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One query per row against the layer's records: ``([B, 1, Hq, Dv], observation [B, Hkv, S] or None)``.

    The new token is real in every row (a one-token step of ``generate``); ``backend`` does not matter here
    (the row is computed explicitly, like the float path's observed decode rows).
    """
    layer.observe_padding(None)
    kc, vc = layer.codecs
    krec, vrec = layer.keys, layer.values  # [B, Hkv, S, R]
    fresh_k, fresh_v = layer.fresh  # [B, Hkv, 1, D]
    b, hq, _, d = query.shape
    hkv, s = krec.shape[1], krec.shape[-2]
    g = hq // hkv
    old = s - 1  # every slot but this step's token
    qs = (query.float() * scaling).reshape(b, hkv, g, d)
    qsum = qs.sum(-1, keepdim=True)  # [B, Hkv, G, 1]
    # 4 bits: the low nibbles hold the even elements, the high ones the odd (quant._pack), so the query is split
    # the same way instead of unpacking the levels into an interleaved copy
    halves = F.pad(qs, (0, d % 2)).unflatten(-1, (-1, 2)).unbind(-1) if kc.bits == 4 else None
    logits = torch.empty((b, hkv, g, s), dtype=torch.float32, device=query.device)
    step = _block(b * hkv * kc.dim)
    for a in range(0, old, step):
        e = min(old, a + step)
        t = kc.view(krec[:, :, a:e])
        if halves is None:
            dots = torch.matmul(qs, levels(t).transpose(-1, -2))  # [B, Hkv, G, n]
        else:
            low, high = _nibbles(t.lsb)
            dots = torch.matmul(halves[0], low.transpose(-1, -2)) + torch.matmul(halves[1], high.transpose(-1, -2))
        logits[..., a:e] = dots * t.scale[..., 0][:, :, None, :] + qsum * t.lo[..., 0][:, :, None, :]
    logits[..., old:] = torch.matmul(qs, fresh_k.float().transpose(-1, -2))
    allowed = layer.attention_allowed(1, sliding_window)  # [B, H or 1, 1, S] or None
    if allowed is not None:
        logits.masked_fill_(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs[..., old:], fresh_v.float())  # [B, Hkv, G, Dv]
    step = _block(b * hkv * vc.dim)
    for a in range(0, old, step):
        e = min(old, a + step)
        t = vc.view(vrec[:, :, a:e])
        p = probs[..., a:e]
        ps = p * t.scale[..., 0][:, :, None, :]
        if vc.bits == 4:
            low, high = _nibbles(t.lsb)
            out += torch.stack([torch.matmul(ps, low), torch.matmul(ps, high)], dim=-1).flatten(-2)[..., : vc.dim]
        else:
            out += torch.matmul(ps, levels(t))
        out += (p * t.lo[..., 0][:, :, None, :]).sum(-1, keepdim=True)
    obs = None
    if not layer.frozen and layer.policy.observation != "none":
        qv = torch.ones((b, 1), dtype=torch.bool, device=query.device)
        obs, _ = estimate_observation(layer.policy, query, key, allowed, qv, scaling, probs=probs.unsqueeze(3),
                                      parallel=parallel_of(layer))  # tensor parallel: heads averaged over ranks
    return out.reshape(b, hq, 1, -1).transpose(1, 2).to(query.dtype).contiguous(), obs


def check_kv_bits(kv_bits: object, method: str, refuse: str | None = None) -> tuple[int, int] | None:
    """Validate ``kv_bits`` before anything changes; a method without quantized storage passes why as ``refuse``
    and any ``kv_bits`` is refused with it (typed error)."""
    bits = parse_kv_bits(kv_bits)
    if bits is not None and refuse is not None:
        raise InvalidParameterError(f"kv_bits applies to the eviction policies, not to {method}: {refuse}")
    return bits


def make_quantized_cache(model: torch.nn.Module, policy: Any, budget: Any, bits: tuple[int, int], **kwargs: Any
                         ) -> QuantizedPruningCache:
    """A :class:`QuantizedPruningCache` for ``model`` with the block-wise decode attention attached."""
    cache = QuantizedPruningCache(policy, budget, kv_bits=bits, config=model.config, **kwargs)
    cache.attach_attention(quantized_decode_attention)
    return cache
