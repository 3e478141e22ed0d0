"""SpAtten's forward and attention for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3).

The forward runs the new tokens layer by layer and, after each layer, lets the cache prune
tokens and heads (cascade): a token pruned there is gathered out of the hidden states, so later
layers really compute fewer queries and keys. The attention function computes only the heads
still present, accumulates token importance (probabilities summed over heads and queries) and
head importance (L1 of each head's output), and, with quantized storage, recomputes the rows
whose largest MSB-only probability is below ``tau`` from the full stored precision.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..caches.contract import StepContext
from ..caches.quant import QTensor
from ..caches.spatten import SpAttenCache, SpAttenLayer
from ..errors import InvalidParameterError
from ..policies import configure
from ..policies.base import rank_grid
from ..policies.spatten import SpAtten
from .attention import BLOCK_ELEMENTS
from .factories import builds, refuse_schedule
from .forward import prepare_stepwise
from .prepare import check_architecture, prepare_model
from .quantized import check_kv_bits
from .selective import final_output, run_layers
from .stepping import step_inputs


class _SpAttenStep:
    """SpAtten at one step: a layer computes the new tokens still present there (the cascade only removes);
    after each layer the cache prunes tokens and heads."""

    uniform = False  # the cascade may prune after any layer

    def __init__(self, cache: SpAttenCache, valid: torch.Tensor, start: int) -> None:
        self.cache, self.valid, self.start = cache, valid, start

    def todo(self, idx: int) -> torch.Tensor:
        return self.valid & (self.cache.depth[:, self.start :] > idx)

    def context(self, idx: int, query_positions: torch.Tensor, query_valid: torch.Tensor, padded: bool) -> StepContext:
        return StepContext(query_positions, query_valid, padded=padded)

    def after(self, idx: int, step: StepContext, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        self.cache.counters.per_layer_tokens[idx] += int(step.query_valid.sum())
        self.cache.prune_after(idx)


@torch.no_grad()
def spatten_forward(
    base: torch.nn.Module,
    cache: SpAttenCache,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> BaseModelOutputWithPast:
    """One step through ``base`` (e.g. ``LlamaModel``); tokens pruned before the last layer get NaN outputs."""
    hidden, valid, position_ids = step_inputs(base, cache.n_seen, input_ids, attention_mask, position_ids, inputs_embeds)
    start = cache.n_seen
    cache.append_tokens(valid)
    n_valid = cache.token_valid.sum(-1)  # [B]
    k_new = valid.sum(-1)
    # what an unpruned cache would do this step, per layer: causal (query, key) pairs over every head
    # (over this rank's heads when the model is tensor-parallel: the counters are the rank's own)
    cache.step_full_pairs = int((k_new * n_valid - k_new * (k_new - 1) // 2).sum()) * (cache.num_heads // cache.parallel.size)
    run_layers(base, cache, _SpAttenStep(cache, valid, start), hidden, position_ids, offset=start)
    return final_output(base, cache, hidden, cache.depth[:, start:] == len(cache.layers))


def _probs(query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax rows ``[B, G, q, N]`` (at least float32) of ``query [B, G, q, D]`` against ``key [B, N, D]``."""
    logits = torch.matmul(query, key[:, None].transpose(-1, -2)) * scaling
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1)


class _Lazy:
    """A value computed on first call, then reused."""

    def __init__(self, fn) -> None:
        self.fn, self.value = fn, None

    def __call__(self):
        if self.value is None:
            self.value = self.fn()
        return self.value


def progressive_rows(query, key_msb, value_msb, full_kv, allowed, scaling: float, tau: float, rows: torch.Tensor):
    """SpAtten's progressive quantization for one KV head: ``(probs, output, refetched)``.

    Rows are computed from the MSB-only ``key_msb``/``value_msb`` (``[B, N, D]``); the ``rows``
    (``[B, G, q]``) whose largest probability is below ``tau`` are recomputed from ``full_kv()``
    (keys and values with their LSBs), which is only called when some row needs it.
    """
    p = _probs(query, key_msb, allowed, scaling)
    o = torch.matmul(p.to(value_msb.dtype), value_msb[:, None])
    # on the ranking grid: a row whose largest probability is within float noise of tau decides alike
    # alone and in a batch (a flip would change its output by the MSB quantization error)
    low = (rank_grid(p.amax(-1)) < tau) & rows
    if bool(low.any()):
        k_full, v_full = full_kv()
        p_full = _probs(query, k_full, allowed, scaling)
        o_full = torch.matmul(p_full.to(v_full.dtype), v_full[:, None])
        p = torch.where(low[..., None], p_full, p)
        o = torch.where(low[..., None], o_full, o)
    return p, o, low


def spatten_attention(
    layer: SpAttenLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str, scaling: float,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, None]:
    """Attention of the present heads over the present tokens (read from the layer's stored parts, not from the
    first-pass ``key``/``value``); returns ``([B, q, Hq, Dv], None)``: the cascade's scores go to the cache."""
    cache = layer.cache
    policy: SpAtten = cache.policy
    b, hq, q, _ = query.shape
    group = cache.num_heads // cache.num_kv_heads
    # head indices are global (head_depth, head_score, kv_heads); a tensor-parallel rank's query holds heads q0..
    q0 = cache.parallel.local_range(cache.num_heads)[0]
    allowed = layer.attention_allowed(q, sliding_window)  # [B, 1, q, N]
    qvalid = layer.step.query_valid  # [B, q]
    active = cache.head_depth > layer.layer_idx  # [B, Hq]
    quantized = isinstance(layer.keys, QTensor)
    keys_first, values_first = layer.first_pass_keys(), layer.first_pass_values()
    keys_full = values_full = None
    n = keys_first.shape[-2]
    out = query.new_zeros((b, hq, q, values_first.shape[-1]))
    token_score = torch.zeros((b, n), dtype=torch.float32, device=query.device)
    head_gain = torch.zeros((b, cache.num_heads), dtype=torch.float32, device=query.device)
    qw = qvalid.to(torch.float32)
    n_keys = allowed[:, 0].sum(-1).to(torch.float32) * qw  # [B, q] keys each real query reads
    elem = keys_first.element_size()
    c = cache.counters
    for j, g in enumerate(layer.kv_heads.tolist()):
        heads = torch.arange(g * group, (g + 1) * group, device=query.device)
        act = active[:, heads]  # [B, G]
        sel = torch.nonzero(act.any(0)).flatten()
        if sel.numel() == 0:
            continue
        heads, act = heads[sel], act[:, sel].to(torch.float32)
        qg = query[:, heads - q0]  # [B, G', q, D]
        kg, vg = keys_first[:, j], values_first[:, j]
        row_w = act[:, :, None] * qw[:, None, :]  # [B, G', q]: real query rows of present heads
        step = max(1, BLOCK_ELEMENTS // max(1, b * sel.numel() * n))
        use_kernel = backend != "eager" and not quantized
        if use_kernel:
            mask = allowed.expand(-1, sel.numel(), -1, -1)
            kx, vx = kg[:, None].expand(-1, sel.numel(), -1, -1), vg[:, None].expand(-1, sel.numel(), -1, -1)
            og = F.scaled_dot_product_attention(qg, kx, vx, attn_mask=mask, scale=scaling)
        else:
            og = torch.empty((b, sel.numel(), q, vg.shape[-1]), dtype=query.dtype, device=query.device)
        for s0 in range(0, q, step):
            s1 = min(q, s0 + step)
            rows_allowed = allowed[:, :, s0:s1]
            if quantized:
                if keys_full is None:  # dequantized lazily: only read when some row needs its LSBs
                    keys_full = _Lazy(layer.full_keys)
                    values_full = _Lazy(layer.full_values)
                p, o, low = progressive_rows(
                    qg[:, :, s0:s1], kg, vg, lambda j=j, kf=keys_full, vf=values_full: (kf()[:, j], vf()[:, j]), rows_allowed, scaling,
                    policy.tau, row_w[:, :, s0:s1] > 0,
                )
                n_low = int(low.sum())
                if not use_kernel:
                    og[:, :, s0:s1] = o
                # traffic: every row reads the MSBs of the keys (and values) it attends; refetched rows the LSBs too
                keys_read = n_keys[:, None, s0:s1] * row_w[:, :, s0:s1]
                msb = layer.keys.msb_bytes_per_vector() + (
                    layer.values.msb_bytes_per_vector() if isinstance(layer.values, QTensor) else vg.shape[-1] * elem
                )
                lsb = layer.keys.lsb_bytes_per_vector() + (
                    layer.values.lsb_bytes_per_vector() if isinstance(layer.values, QTensor) else 0.0
                )
                c.bytes_read += float(keys_read.sum()) * msb + float((keys_read * low).sum()) * lsb
                c.rows_refetched += n_low
            else:
                p = _probs(qg[:, :, s0:s1], kg, rows_allowed, scaling)
                if not use_kernel:
                    og[:, :, s0:s1] = torch.matmul(p.to(vg.dtype), vg[:, None])
                c.bytes_read += float((n_keys[:, None, s0:s1] * row_w[:, :, s0:s1]).sum()) * (kg.shape[-1] + vg.shape[-1]) * elem
            # Algorithm 1: importance += probabilities summed over the present heads and the real queries
            token_score += (p * row_w[:, :, s0:s1, None]).sum(dim=(1, 2))
        og = og * act[:, :, None, None].to(og.dtype)  # heads pruned in some rows only (batch > 1): zero there
        out[:, heads - q0] = og
        # head importance: L1 magnitude of each head's attention output over the real queries
        head_gain[:, heads] = (og.float().abs().sum(-1) * qw[:, None, :]).sum(-1) * act
        c.rows += int(row_w.sum())
        c.qk_products += int((n_keys[:, None, :] * row_w).sum())
    c.qk_products_full += cache.step_full_pairs
    c.bytes_read_full += cache.step_full_pairs * (keys_first.shape[-1] + values_first.shape[-1]) * query.element_size()
    # tensor parallel: both scores combine every rank's heads (one all-reduce), so all ranks prune alike
    if cache.parallel.active:
        both = cache.parallel.all_reduce_sum(torch.cat([token_score, head_gain], dim=-1))
        token_score, head_gain = both[:, :n], both[:, n:]
    cache.head_score += head_gain
    token_score = token_score.masked_fill(~layer.valid, 0.0)
    cache.score.scatter_add_(1, layer.positions.clamp(min=0), token_score)
    return out.transpose(1, 2).contiguous(), None


@builds(SpAtten)
def make_spatten_cache(model: torch.nn.Module, policy: SpAtten | str | None = None, budget: float | None = None,
                       *, backend: str | None = None, prefill_only: bool = False, evict_every: int = 1,
                       kv_bits: object = None, **params: Any) -> SpAttenCache:
    """Prepare ``model`` for SpAtten and return a fresh :class:`SpAttenCache` (one per conversation).

    ``budget`` (optional) is the fraction of the full cache's KV memory to keep, averaged over layers:
    it sets ``token_ratio`` (:meth:`SpAtten.for_memory`); otherwise ``token_ratio`` is used as given.
    """
    check_architecture(model.config)
    refuse_schedule("SpAtten", prefill_only, evict_every)
    check_kv_bits(kv_bits, "spatten", "SpAtten quantizes with its own progressive scheme: pass quant_bits=(msb, lsb), "
                  "e.g. (8, 4)")
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    n_layers = config.num_hidden_layers
    given = configure(SpAtten, policy, params)  # the object, or one built from the names (typed errors)
    if budget is not None and given is policy:
        raise InvalidParameterError("pass SpAtten parameters either in the policy object or as keywords/budget, not both")
    policy = SpAtten.for_memory(budget, n_layers, **params) if budget is not None else given
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    cache = SpAttenCache(policy, n_layers, n_heads, n_kv)  # validates the schedules before the model changes
    cache.step_forward, cache.layer_attention = spatten_forward, spatten_attention
    prepare_model(model, backend)
    prepare_stepwise(model)
    return cache
