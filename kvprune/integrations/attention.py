"""kvprune's attention function: real kernels for the output, and the scores fused kernels never return.

Registered with transformers' ``AttentionInterface`` as ``kvprune_eager``, ``kvprune_sdpa`` and
``kvprune_flash_attention_2``. Per layer it builds the mask from the cache's positions and
padding, computes the output with the named backend, and hands the policy the observation it
declared: the decode query's softmax row (the output is computed from that same row), the last
``w`` prefill queries, or weighted column sums over all prefill queries in bounded query blocks.
Probabilities are float32 and averaged over the query heads of each KV group (GQA).
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from ..caches import ATTN_PREFIX
from ..caches.contract import AttentionLayer, OrderedQueries, layer_of
from ..distributed import SINGLE, TensorParallel, check_shard, parallel_of
from ..policies import Policy

BACKENDS = ("eager", "sdpa", "flash_attention_2")
#: float32 elements of attention probabilities materialised at once by the block estimator
BLOCK_ELEMENTS = 1 << 20
#: a decode row nobody observes goes to the SDPA kernel up to this many keys, and without GQA also from
#: DECODE_KERNEL_MIN_KEYS on; elsewhere the explicit row is faster on CPU. Measured per row (one thread):
#: 8 query / 2 KV heads of 32: 256 keys explicit 22 us, kernel 15; 768: 37 / 38; 2048: 68 / 97; 8192:
#: 203 / 391 (the kernel's GQA path); 4 heads of 128, no GQA: 256: 35 / 21; 2048: 158 / 169; 4096: 535 / 438
DECODE_KERNEL_MAX_KEYS = 768
DECODE_KERNEL_MIN_KEYS = 2048
#: from this many queries in position order against unordered slots (LazyLLM's revived tokens), attention
#: runs in STAIRCASE_BLOCKS query blocks, each against only the keys up to its last position
STAIRCASE_MIN_QUERIES = 256
STAIRCASE_BLOCKS = 8


def grouped_probs(
    query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor | None, scaling: float, causal_from: int | None = None
) -> torch.Tensor:
    """Softmax rows ``[B, Hkv, G, q, S]`` (at least float32) without expanding keys to query heads.

    ``causal_from``: instead of a mask, the q rows are the keys ``causal_from..causal_from+q-1`` in order
    (every earlier key visible): only that trailing square gets the causal fill.
    """
    b, hq, q, _ = query.shape
    hkv = key.shape[1]
    logits = _group_logits(query, key, scaling).view(b, hkv, hq // hkv, q, -1)  # the mask goes on in place
    if allowed is not None:  # None: every slot is visible (a decode step over valid slots)
        logits.masked_fill_(~allowed.unsqueeze(2), float("-inf"))
    elif causal_from is not None and q > 1:
        future = torch.ones((q, q), dtype=torch.bool, device=logits.device).triu_(1)
        logits[..., causal_from : causal_from + q].masked_fill_(future, float("-inf"))
    return torch.softmax(logits, dim=-1)


def decode_row(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per row against every slot (a decode step, no mask): the output ``[B, Hq, 1, Dv]`` and the
    softmax rows ``[B * Hkv, G, S]`` it was computed from (at least float32), in as few ops as the step allows
    (a decode step is mostly per-op overhead): :func:`grouped_probs` and :func:`grouped_output` for ``q = 1``."""
    probs = torch.softmax(_group_logits(query, key, scaling), dim=-1)
    return _group_apply(probs, value).view(query.shape[0], query.shape[1], 1, -1), probs


def _group_logits(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scaled logits ``[B * Hkv, G * q, S]`` (at least float32): the G query heads of a KV group are stacked as extra
    rows of one ``bmm`` over (row, KV head), with no broadcast copy of K; the scale goes on the (small) queries.
    ``bmm``, not ``matmul``: a decode step is mostly per-op overhead, and matmul's 4-D path dispatches several
    views around the same product."""
    b, hq, q, d = query.shape
    hkv = key.shape[1]
    logits = torch.baddbmm(_zero(query.dtype, query.device), query.reshape(b * hkv, hq // hkv * q, d),
                           _batched(key, transpose=True), beta=0.0, alpha=scaling)  # beta 0: the zero is not read
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


@functools.lru_cache(maxsize=8)
def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``[1, 1, 1]`` zero: ``baddbmm``'s ignored addend when it scales a product (one op instead of two)."""
    return torch.zeros((1, 1, 1), dtype=dtype, device=device)


def _group_apply(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``probs [B * Hkv, G * q, S] @ value`` per (row, KV head): ``[B * Hkv, G * q, Dv]`` in the value's dtype."""
    return torch.bmm(probs if probs.dtype == value.dtype else probs.to(value.dtype), _batched(value))


def _batched(t: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``t [B, H, S, D]`` as ``[B * H, S, D]`` (``[B * H, D, S]`` with ``transpose``) for ``bmm``. When ``t`` is a
    view of a buffer and this a view of the same, it is kept on ``t`` (a cache layer hands the same held-slot view
    to every step with that many slots). Never kept on a tensor that owns its memory (the view would hold it in a
    reference cycle, freed only by the garbage collector: a plain cache's concatenated keys), nor when flattening
    copies (a copy would not follow ``t``'s contents)."""
    name = "_kvprune_bmm_t" if transpose else "_kvprune_bmm"
    view = getattr(t, name, None)
    if view is None:
        view = t.flatten(0, 1).transpose(1, 2) if transpose else t.flatten(0, 1)
        if t._is_view() and view.data_ptr() == t.data_ptr():
            setattr(t, name, view)
    return view


def grouped_output(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``probs @ value`` per KV group, returned as ``[B, Hq, q, Dv]``."""
    b, hkv, g, q, s = probs.shape
    return _group_apply(probs.reshape(b * hkv, g * q, s), value).view(b, hkv * g, q, -1)


def reduce_probs(probs: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Weighted sum over queries, mean over the group: ``[B, Hkv, G, q, S]`` -> ``[B, Hkv, S]``.

    One matrix product with the weights (no weighted copy of the probabilities).
    """
    b, hkv, g, q, s = probs.shape
    w = torch.ones((b, q), dtype=probs.dtype, device=probs.device) if weights is None else weights.to(probs.dtype)
    w = (w / g).repeat(1, g)[:, None, None, :]  # [B, 1, 1, G*q]
    return torch.matmul(w, probs.reshape(b, hkv, g * q, s)).view(b, hkv, s)


def _expand_heads(allowed: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, h, q, s = allowed.shape
    if h == 1:
        return allowed
    return allowed[:, :, None].expand(b, h, n_heads // h, q, s).reshape(b, n_heads, q, s)


def sdpa_output(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    mask = None if allowed is None else _expand_heads(allowed, query.shape[1])
    gqa = query.shape[1] != key.shape[1]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)


def staircase_output(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``sdpa_output`` for queries in ascending position (``query_pos [B, q]``) against slots in any order
    (``key_pos [B, S]``) under a causal-by-position mask: with the slots put in position order, each query
    block reads only the keys up to its last position, so the mask's empty part is skipped, not computed."""
    q = query.shape[2]
    order = key_pos.argsort(dim=-1, stable=True)  # padding slots (-1) first
    key_pos = key_pos.gather(-1, order)
    key = key.gather(2, order[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[-1]))
    value = value.gather(2, order[:, None, :, None].expand(-1, value.shape[1], -1, value.shape[-1]))
    allowed = allowed.gather(-1, order[:, None, None, :].expand(-1, allowed.shape[1], q, -1))
    step = -(-q // STAIRCASE_BLOCKS)
    out = []
    for start in range(0, q, step):
        stop = min(q, start + step)
        width = max(1, int((key_pos <= query_pos[:, stop - 1 : stop]).sum(-1).max()))
        out.append(sdpa_output(query[:, :, start:stop], key[:, :, :width], value[:, :, :width],
                               allowed[:, :, start:stop, :width], scaling))
    return torch.cat(out, dim=2)


def dense_causal_output(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query_pos: torch.Tensor,
                        key_pos: torch.Tensor, scaling: float, flash: bool) -> torch.Tensor:
    """Queries at ascending positions ``query_pos [B, q]`` against slots holding every position ``0..S-1`` once
    (``key_pos [B, S]``, any order), causal by position: the slots put in position order and the queries
    scattered to their positions make it one plain causal kernel call (the unused rows cost no mask)."""
    b, hq, q, d = query.shape
    order = key_pos.argsort(dim=-1)
    key = key.gather(2, order[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[-1]))
    value = value.gather(2, order[:, None, :, None].expand(-1, value.shape[1], -1, value.shape[-1]))
    rows = query_pos[:, None, :, None].expand(-1, hq, -1, d)
    full = query.new_zeros((b, hq, key.shape[2], d)).scatter_(2, rows, query)
    out = causal_output(full, key, value, scaling, flash)
    return out.gather(2, query_pos[:, None, :, None].expand(-1, hq, -1, out.shape[-1]))


def read_rows_output(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None,
                     ordered: OrderedQueries, scaling: float) -> torch.Tensor:
    """The output of only the queries ``ordered.read [B, r]`` (zeros elsewhere: nobody reads those rows)."""
    b, hq, q, d = query.shape
    idx = ordered.read
    rows = query.gather(2, idx[:, None, :, None].expand(-1, hq, -1, d))
    if allowed is None:  # every slot real and selected: a row sees the slots at or before its position
        qpos = ordered.query_positions.gather(1, idx)
        allowed = (ordered.slot_positions[:, None, None, :] <= qpos[:, None, :, None])
    else:
        allowed = allowed.gather(2, idx[:, None, :, None].expand(-1, allowed.shape[1], -1, allowed.shape[-1]))
    part = sdpa_output(rows, key, value, allowed, scaling)
    out = query.new_zeros((b, hq, q, value.shape[-1]))
    return out.scatter_(2, idx[:, None, :, None].expand(-1, hq, -1, value.shape[-1]), part)


def causal_output(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, flash: bool) -> torch.Tensor:
    """Plain causal attention (queries and keys are the same tokens in order): FlashAttention-2 or SDPA."""
    if flash and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func  # optional extra: pip install kvprune[flash]

        out = flash_attn_func(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scaling, causal=True
        )
        return out.transpose(1, 2)
    gqa = query.shape[1] != key.shape[1]
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)


def _block_rows(allowed: torch.Tensor | None, start: int, stop: int, q: int, s: int) -> tuple[int, torch.Tensor | None]:
    """Key width and mask for query rows ``[start, stop)``: the queries are the last ``q`` of ``s`` slots, in order,
    so no row before ``stop`` sees a slot at or after ``s - q + stop``."""
    width = s - q + stop
    return width, None if allowed is None else allowed[:, :, start:stop, :width]


def _observation_rows(policy: Policy, q: int, query_valid: torch.Tensor | None,
                      device: torch.device | None = None) -> tuple[int, torch.Tensor]:
    """First query row the observation needs and the per-row weights ``[B or 1, q - first]`` (None: all real)."""
    if query_valid is None:
        query_valid = torch.ones((1, q), dtype=torch.bool, device=device)
    if policy.observation == "last_query":
        first = q - 1
        return first, query_valid[:, first:].float()
    if policy.observation == "window":
        first = max(0, q - policy.window_size)
        return first, query_valid[:, first:].float()
    # rows whose weight is below 2**-30 of the largest (A2SF's oldest queries, alpha**age) are skipped: together
    # they move a score by at most 2**-30 / (1 - alpha) of the largest row's weight, under float32 resolution
    w = policy.query_weights(q)
    first = int(torch.nonzero(w >= float(w.max()) * 2.0**-30)[0]) if q > 1 else 0
    return first, w[first:].to(query_valid.device)[None, :] * query_valid[:, first:].float()


def estimate_observation(
    policy: Policy,
    query: torch.Tensor,
    key: torch.Tensor,
    allowed: torch.Tensor | None,
    query_valid: torch.Tensor | None,
    scaling: float,
    probs: torch.Tensor | None = None,
    causal: bool = False,
    value: torch.Tensor | None = None,
    parallel: TensorParallel = SINGLE,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The observation ``policy`` declared, as ``[B, Hkv, S]`` float32 (None for ``"none"``), and an output.

    ``query_valid [B, q]``: which queries are real (None: all). ``probs`` (all rows, from an eager pass) is reused when given; otherwise only the rows the
    observation needs are computed, in blocks of at most ``BLOCK_ELEMENTS`` probabilities, each
    trimmed to the keys its rows can see (``allowed``, or a plain causal mask when ``causal``).
    With ``value`` (only for observations over all queries) the same probabilities also give the
    attention output ``[B, Hq, q, Dv]`` -- one pass instead of a kernel call plus an estimate.
    ``parallel``: the tensor-parallel group (this rank holds a slice of the heads); a policy whose keep-set is
    shared across heads then averages over every rank's heads (one all-reduce), so all ranks decide alike.
    """
    if policy.observation == "none":
        return None, None
    b, hq, q, _ = query.shape
    out = None
    if probs is not None and q == 1 and query_valid is None:
        # a decode step with every row real: the one row averaged over the group (a single query weighs 1,
        # Policy.query_weights): one op instead of building weights for a product
        obs = probs.mean(dim=2).view(b, probs.shape[1], -1)
    elif probs is not None:
        first, weights = _observation_rows(policy, q, query_valid, query.device)
        obs = reduce_probs(probs[:, :, :, first:], weights)
    else:
        first, weights = _observation_rows(policy, q, query_valid, query.device)
        s = key.shape[-2]
        step = max(1, BLOCK_ELEMENTS // max(1, b * hq * s))
        obs = torch.zeros((b, key.shape[1], s), dtype=torch.float32, device=query.device)
        if value is not None:
            out = query.new_empty((b, hq, q, value.shape[-1]))
        for start in range(first, q, step):
            stop = min(q, start + step)
            w = weights[:, start - first : stop - first]
            if value is None and not bool((w != 0).any()):  # e.g. A2SF weights that underflowed, or padding
                continue
            width, rows = _block_rows(allowed, start, stop, q, s)
            diag = s - q + start if causal and rows is None else None  # plain causal: fill only the diagonal square
            p = grouped_probs(query[:, :, start:stop], key[:, :, :width], rows, scaling, causal_from=diag)
            obs[..., :width] += reduce_probs(p, w)
            if out is not None:
                out[:, :, start:stop] = grouped_output(p, value[:, :, :width])
    return across_heads(policy, obs, parallel), out


def across_heads(policy: Policy, obs: torch.Tensor, parallel: TensorParallel) -> torch.Tensor:
    """``obs [B, Hkv, S]`` as the policy reads it: averaged over every KV head when its keep-set is shared across
    heads (alone: ``obs.mean(1)``; sharded: over every rank's heads, one all-reduce), else unchanged."""
    if policy.shared_across_heads:
        return parallel.head_mean(obs, dim=1).expand_as(obs)
    return obs


#: (the last 2D padding mask seen, its version, whether its newest column is all real): every layer of a forward
#: gets the same mask object, so a decode step checks it (a device sync) once instead of once per layer
_NEWEST: tuple[weakref.ref, int, bool] | None = None


def _newest_real(attention_mask: torch.Tensor) -> bool:
    """Whether every row's newest token is real in the 2D padding mask (memoised per mask object and version)."""
    global _NEWEST
    memo = _NEWEST
    if memo is not None and memo[0]() is attention_mask and memo[1] == attention_mask._version:
        return memo[2]
    real = bool(attention_mask[:, -1].all())
    _NEWEST = (weakref.ref(attention_mask), attention_mask._version, real)
    return real


def _padding_of_new_tokens(attention_mask: Any, q: int, b: int) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        from ..errors import InvalidParameterError

        raise InvalidParameterError(
            "kvprune builds its own per-layer masks and needs the 2D padding mask [batch, tokens]; "
            f"got a {type(attention_mask).__name__} of shape {getattr(attention_mask, 'shape', None)}"
        )
    return attention_mask[:, -q:].to(torch.bool).expand(b, q)


def _plain_allowed(attention_mask: torch.Tensor | None, b: int, q: int, s: int, device: torch.device, window: int | None) -> torch.Tensor:
    """Mask for a model run without a kvprune cache (keys are the whole stream, positions 0..S-1)."""
    kpos = torch.arange(s, device=device)[None, None, None, :]
    qpos = torch.arange(s - q, s, device=device)[None, None, :, None]
    allowed = kpos <= qpos
    if window is not None:
        allowed = allowed & (kpos > qpos - window)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, -s:].to(torch.bool)[:, None, None, :]
    return allowed | (kpos == qpos)


def _allowed(layer, attention_mask, new_valid, b, q, s, device, window) -> torch.Tensor | None:
    if layer is not None:
        return layer.attention_allowed(q, window)
    return _plain_allowed(attention_mask if new_valid is not None else None, b, q, s, device, window)


def kvprune_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The function registered for ``kvprune_<backend>``; returns ``([B, q, Hq, Dv], weights or None)``."""
    impl = module.config._attn_implementation
    backend = impl[len(ATTN_PREFIX) :] if impl.startswith(ATTN_PREFIX) else "sdpa"
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    b, _, q, _ = query.shape
    s = key.shape[-2]
    layer: AttentionLayer | None = layer_of(key)
    if layer is not None and layer.pending == q:  # a sharded model needs a cache that knows its group
        check_shard(parallel_of(layer), query.shape[1], getattr(module.config, "num_attention_heads", None))
    if layer is not None and layer.pending == q and layer.own_attention is not None:
        # a layer that computes its attention itself (SpAtten's pruned heads and quantized parts)
        out, obs = layer.own_attention(layer, query, key, value, backend, scaling, sliding_window)
        layer.finish(obs)
        return out, None
    if layer is not None and layer.pending == q:
        if q == 1 and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and _newest_real(attention_mask):
            new_valid = None  # the common decode step: the new token is real in every row
        else:
            new_valid = _padding_of_new_tokens(attention_mask, q, b)
        layer.observe_padding(new_valid)
        # frozen: nothing to observe this step (prefill_only past the prefill; LazyLLM off its pruning layers)
        policy = None if layer.frozen else layer.policy
        causal = q > 1 and layer.is_plain_causal(q, sliding_window)
    else:
        new_valid = _padding_of_new_tokens(attention_mask, q, b)
        layer, policy = None, None
        causal = q > 1 and q == s and (new_valid is None or bool(new_valid.all())) and (sliding_window or q) >= q
    weights: torch.Tensor | None = None
    obs = None
    # a decode row the policy observes is computed once for output and scores; one nobody observes goes to
    # the kernel or the explicit row, whichever is faster at this many keys (DECODE_KERNEL_MAX/MIN_KEYS)
    observed = policy is not None and policy.observation != "none"
    if not observed:
        policy = None  # nothing to estimate
    qv = new_valid  # None: every new token is real
    gqa = query.shape[1] != key.shape[1]
    decode_kernel = not observed and (s <= DECODE_KERNEL_MAX_KEYS or (not gqa and s >= DECODE_KERNEL_MIN_KEYS))
    if backend == "eager" or (q == 1 and not decode_kernel):
        allowed = _allowed(layer, attention_mask, new_valid, b, q, s, query.device, sliding_window)
        if q == 1 and allowed is None and backend != "eager" and qv is None:  # the common decode step
            out, rows = decode_row(query, key, value, scaling)
            # the row averaged over each KV group's query heads (a single query weighs 1), unless the layer folds
            # the rows into its scores itself (one op for the mean and the update)
            if policy is not None and not layer.fold_row(rows):
                obs = across_heads(policy, rows.mean(dim=1).view(b, key.shape[1], -1), parallel_of(layer))
            if layer is not None:
                layer.finish(obs)
            return out.transpose(1, 2).contiguous(), None
        probs = grouped_probs(query, key, allowed, scaling)
        out = grouped_output(probs, value)
        if backend == "eager":
            weights = probs.flatten(1, 2).to(query.dtype)
        if policy is not None:
            obs, _ = estimate_observation(policy, query, key, allowed, qv, scaling, probs=probs,
                                          parallel=parallel_of(layer))
    else:
        # a plain causal mask (fresh prefill, no padding) runs the kernel's own causal path, mask-free,
        # and the estimate builds the causal rows it needs block by block
        # queries in position order against unordered slots (LazyLLM's revived tokens): when the slots hold every
        # position once, all real and selected, the mask is plain causal by position (dense_causal_output)
        ordered = layer.ordered_queries() if layer is not None and not causal and q >= STAIRCASE_MIN_QUERIES else None
        dense = (ordered is not None and ordered.complete and ordered.read is None and policy is None
                 and sliding_window is None and 2 * q >= s)
        # only some rows read (LazyLLM's last layer): with every slot visible their mask comes from positions
        reads = ordered is not None and ordered.read is not None and policy is None
        plain = causal or dense or (reads and ordered.complete and sliding_window is None)
        allowed = None if plain else _allowed(layer, attention_mask, new_valid, b, q, s, query.device, sliding_window)
        # on CPU an observation over every query computes the probabilities anyway: take the output from
        # them too (one pass) instead of running the kernel as well
        # (unless most rows carry no weight, like A2SF's oldest queries: then the kernel plus the few rows)
        one_pass = (
            policy is not None and policy.observation == "all_queries" and not query.is_cuda
            and _observation_rows(policy, q, qv, query.device)[0] == 0
        )
        obs = None
        if policy is not None:
            obs, out = estimate_observation(policy, query, key, allowed, qv, scaling, causal=causal,
                                            value=value if one_pass else None, parallel=parallel_of(layer))
        if not one_pass:
            if reads:
                out = read_rows_output(query, key, value, allowed, ordered, scaling)
            elif causal:
                out = causal_output(query, key, value, scaling, flash=backend == "flash_attention_2")
            elif dense:
                out = dense_causal_output(query, key, value, ordered.query_positions, ordered.slot_positions, scaling,
                                          flash=backend == "flash_attention_2")
            elif ordered is not None and allowed is not None:
                out = staircase_output(query, key, value, allowed, ordered.query_positions, ordered.slot_positions,
                                       scaling)
            else:
                out = sdpa_output(query, key, value, allowed, scaling)
    if layer is not None:
        layer.finish(obs)
    return out.transpose(1, 2).contiguous(), weights


def kvprune_mask(*args: Any, attention_mask: torch.Tensor | None = None, kv_length: int | None = None, **kwargs: Any) -> torch.Tensor | None:
    """Mask "function" for the kvprune implementations: pass the 2D padding mask through untouched."""
    if attention_mask is None or kv_length is None:
        return attention_mask
    return attention_mask[:, -kv_length:]


def register() -> None:
    """Register ``kvprune_<backend>`` attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for backend in BACKENDS:
        AttentionInterface.register(ATTN_PREFIX + backend, kvprune_attention)
        AttentionMaskInterface.register(ATTN_PREFIX + backend, kvprune_mask)
