"""KVzip's driver (arXiv 2505.23416, Algorithm 1): prefill the context, replay it, score, evict.

The cache declares this module's step as its ``step_forward`` (see :mod:`kvprune.integrations.forward`), so
``make_cache(model, "kvzip", budget, tokenizer=tok)`` + ``model.generate(...)`` (or any forward) runs, on the
first forward only:

1. the plain forward of the context (stored whole);
2. per chunk ``c_t`` of ``chunk_size`` context tokens (per row, counted over the row's real tokens):
   a forward of ``instruction + chat-template turn end/answer header + c_t`` against the cache, where each
   layer's attention computes the output over the whole cache (real kernel) and the scores over the
   sub-sampled keys of Algorithm 1 -- the sinks, the chunk's cached pairs, the replay's own tokens -- and
   keeps the largest probability each cached pair receives (max over the query heads of its KV group and
   over the real replay queries); the replay's keys and values are then dropped;
3. eviction to the budget (per head, or globally across heads and layers), sinks protected.

Later forwards (the question, decoding) run plainly against the compressed cache.

Without a tokenizer (``tokenizer=None``) there is no instruction to render: the replay is the chunk's own
ids (chunk t > 1 preceded by the last ``carry_over`` ids of chunk t - 1), i.e. the model reads the text a
second time right after the first and its copying attention does the scoring. That is a documented
approximation of the paper's prompt; pass the tokenizer to get the paper's replay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..caches.kvzip import KVzipCache, KVzipLayer
from ..caches.quantized import parse_kv_bits
from ..errors import InvalidParameterError
from ..policies import configure
from ..policies.kvzip import KVzip
from .attention import grouped_output, grouped_probs, sdpa_output
from .compat import with_cache
from .factories import builds
from .forward import prepare_stepwise
from .prepare import check_architecture, prepare_model

#: float32 attention probabilities materialised at once while scoring a replay (per layer, in query blocks)
SCORE_BLOCK_ELEMENTS = 1 << 23
#: marks where a user message goes when the chat template is rendered to find the turn end / answer header
_MARK = "\u2063KVZIP\u2063"


@dataclass
class ReplayStep:
    """What the replay attention needs besides the queries and keys (set on each layer by the driver)."""

    query_valid: torch.Tensor  # [B, q] real replay tokens
    scored: torch.Tensor  # [B, S_ctx] context slots in the sub-sampled key set (sinks and the chunk)
    whole: bool  # every real context slot is in ``scored``: the scoring softmax is the forward's own


def replay_prompts(tokenizer: Any, policy: KVzip) -> tuple[list[int], list[int], list[int]] | None:
    """Token ids ``(first instruction, later instruction, turn end + answer header)``, or None without a tokenizer.

    The instruction continues the user's turn ("\\n\\n" + ``policy.prompt``); the chat template's text after a
    user message (with the generation prompt) closes the turn and opens the answer, which the context then fills.
    Tokenizers without a chat template get "\\n" there.
    """
    if tokenizer is None:
        return None
    if not callable(getattr(tokenizer, "encode", None)):
        raise InvalidParameterError(f"tokenizer must be a Hugging Face tokenizer (with encode); got {type(tokenizer).__name__}")
    tail = "\n"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt=True,
                                             tokenize=False)
        if _MARK in text:
            tail = text.split(_MARK, 1)[1]

    def enc(s: str) -> list[int]:
        return list(tokenizer.encode(s, add_special_tokens=False))

    return enc("\n\n" + policy.prompt), enc("\n\n" + policy.continuation), enc(tail)


def max_attention(query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor | None, query_valid: torch.Tensor,
                  scaling: float, n_scored: int, value: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KVzip's observation ``[B, Hkv, n_scored]``: for each of the first ``n_scored`` keys, the largest softmax
    probability over the query heads of its group and the real queries (``KVzip.reduce``).

    The ``q`` queries are the last ``q`` keys, in order (a replay appended to the cache): ``allowed`` masks the
    rest, or None for "every earlier key visible" (only the trailing square gets the causal fill). Computed with
    kvprune's estimator (:func:`~kvprune.integrations.attention.grouped_probs`) in query blocks of at most
    ``SCORE_BLOCK_ELEMENTS`` probabilities, each trimmed to the keys its rows can see -- never the whole
    ``q x S`` matrix. With ``value`` the same probabilities also give the output ``[B, Hq, q, Dv]`` (one pass).
    """
    b, hq, q, _ = query.shape
    s = key.shape[-2]
    step = max(1, SCORE_BLOCK_ELEMENTS // max(1, b * hq * s))
    obs = torch.zeros((b, key.shape[1], n_scored), dtype=torch.float32, device=query.device)
    out = None if value is None else query.new_empty((b, hq, q, value.shape[-1]))
    padded = not bool(query_valid.all())
    for start in range(0, q, step):
        stop = min(q, start + step)
        width = s - q + stop  # no row of this block sees a later key
        rows = None if allowed is None else allowed[:, :, start:stop, :width]
        p = grouped_probs(query[:, :, start:stop], key[:, :, :width], rows, scaling,
                          causal_from=s - q + start if allowed is None else None)
        if out is not None:
            out[:, :, start:stop] = grouped_output(p, value[:, :, :width])
        p = p[..., :n_scored]
        block = KVzip.reduce(p, query_valid[:, start:stop]) if padded else p.flatten(2, 3).amax(dim=2)
        torch.maximum(obs, block, out=obs)
    return obs, out


def replay_attention(layer: KVzipLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str,
                     scaling: float, sliding_window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A replay forward's attention in one layer (the layer's ``own_attention`` while the replay runs): the output
    over the whole cache, and the scores over Algorithm 1's sub-sampled keys (sinks, the chunk, the replay)."""
    step: ReplayStep = layer.replay
    q = query.shape[2]
    layer.observe_padding(step.query_valid)
    b, s = key.shape[0], key.shape[-2]
    n_ctx = s - q
    plain = layer.all_valid and sliding_window is None  # every context slot visible to every replay query
    allowed = None if plain else layer.attention_allowed(q, sliding_window)
    obs = torch.zeros((b, key.shape[1], s), dtype=torch.float32, device=key.device)
    if step.whole and not query.is_cuda:
        # the scoring softmax is the forward's own: one pass gives the output and the scores (on CPU)
        obs[..., :n_ctx], out = max_attention(query, key, allowed, step.query_valid, scaling, n_ctx, value=value)
    else:
        if allowed is None:
            allowed = layer.attention_allowed(q, sliding_window)
        out = sdpa_output(query, key, value, allowed, scaling)
        sub = torch.cat([step.scored, torch.ones((b, q), dtype=torch.bool, device=key.device)], dim=-1)  # [B, S]
        cols = sub.any(0).nonzero().squeeze(-1)  # only the sub-sampled columns are computed (replay's last, in order)
        part, _ = max_attention(query, key.index_select(2, cols),
                                (allowed & sub[:, None, None, :]).index_select(-1, cols), step.query_valid, scaling,
                                len(cols) - q)
        obs.index_copy_(-1, cols[: len(cols) - q], part)
    return out.transpose(1, 2).contiguous(), obs


def _chunks(ids: torch.Tensor, mask: torch.Tensor, size: int) -> list[list[torch.Tensor]]:
    """Per row, its real context ids split into chunks of ``size`` tokens."""
    return [list(ids[r][mask[r]].split(size)) for r in range(ids.shape[0])]


def _replay_inputs(chunks: list[list[torch.Tensor]], t: int, prompts: tuple[list[int], list[int], list[int]] | None,
                   carry: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask ``[B, n_in]`` of replay ``t`` (a row without a chunk t is all padding)."""
    rows = []
    for row in chunks:
        if t >= len(row):
            rows.append(torch.empty(0, dtype=torch.long))
            continue
        prev = row[t - 1][-carry:] if t > 0 and carry > 0 else row[t][:0]
        if prompts is None:
            head = prev
        else:
            first, later, tail = prompts
            head = torch.tensor(first) if t == 0 else torch.cat([torch.tensor(later, dtype=torch.long), prev])
            head = torch.cat([head.long(), torch.tensor(tail, dtype=torch.long)])
        rows.append(torch.cat([head.to(row[t].dtype), row[t]]).long())
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
    return ids, mask


@torch.no_grad()
def replay(base: torch.nn.Module, cache: KVzipCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           position_ids: torch.Tensor) -> None:
    """Score every context slot of ``cache`` by KVzip's replay (steps 2 of the module docstring), then evict."""
    policy: KVzip = cache.policy
    layers: list[KVzipLayer] = [layer for layer in cache.layers if layer.is_initialized]
    device = input_ids.device
    mask = attention_mask.to(torch.bool)
    chunks = _chunks(input_ids.cpu(), mask.cpu(), policy.chunk_size)
    prompts = replay_prompts(cache.tokenizer, policy)
    pad_id = int(getattr(base.config, "pad_token_id", None) or 0)
    ranks = layers[0].ranks[:, 0, :].long()  # [B, S_ctx]: each slot's index among its row's tokens (-1: padding)
    start_pos = position_ids[:, -1:].long() + 1  # the replay continues each row's positions
    n_chunks = max(len(c) for c in chunks)
    for layer in layers:
        layer.begin_replay()
        layer.own_attention = replay_attention
    try:
        for t in range(n_chunks):
            ids, rmask = _replay_inputs(chunks, t, prompts, policy.carry_over, pad_id)
            ids, rmask = ids.to(device), rmask.to(device)
            lo, hi = t * policy.chunk_size, (t + 1) * policy.chunk_size
            scored = (ranks >= 0) & (((ranks >= lo) & (ranks < hi)) | (ranks < policy.n_sink))
            step = ReplayStep(query_valid=rmask.bool(), scored=scored,
                              whole=bool((scored == (ranks >= 0)).all()))
            for layer in layers:
                layer.replay = step
            pos = start_pos + (rmask.cumsum(-1) - 1).clamp(min=0)
            full_mask = torch.cat([mask.long(), rmask], dim=-1)
            type(base).forward(base, input_ids=ids, attention_mask=full_mask, position_ids=pos, use_cache=True,
                               **with_cache(cache))
            for layer in layers:
                layer.drop_replay()
    finally:
        for layer in layers:
            layer.own_attention, layer.replay = None, None
    cache.compress()


def kvzip_step(base: torch.nn.Module, cache: KVzipCache, input_ids: torch.Tensor | None,
               attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
               inputs_embeds: torch.Tensor | None) -> Any:
    """The decoder stack's forward with a KVzip cache: the plain forward, followed on the first one by the replay."""
    first = cache.stage == "context" and cache.get_seq_length() == 0
    if first and input_ids is None:
        raise InvalidParameterError("kvzip replays the context's token ids: pass input_ids (not inputs_embeds) "
                                    "for the first forward")
    out = type(base).forward(base, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=True, **with_cache(cache))
    if first:
        t0 = time.perf_counter()
        q = input_ids.shape[1]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask[:, -q:]
        pos = position_ids if position_ids is not None else (mask.long().cumsum(-1) - 1).clamp(min=0)
        replay(base, cache, input_ids, mask, pos.expand(input_ids.shape[0], q))
        cache.replay_seconds = time.perf_counter() - t0
    return out


@builds(KVzip)
def make_kvzip_cache(model: torch.nn.Module, policy: str | KVzip = "kvzip", budget: Any = None, *,
                     backend: str | None = None, prefill_only: bool = False, evict_every: int = 1,
                     kv_bits: object = None, tokenizer: Any = None, **params: Any) -> KVzipCache:
    """Prepare ``model`` and return a :class:`~kvprune.caches.kvzip.KVzipCache` whose first forward is replayed.

    ``tokenizer`` renders the replay's instruction through its chat template (None: the tokenizer-free replay
    of the module docstring). On a tensor-parallel model the replay is a plain forward, so each rank scores its
    own KV heads; scope='global' ranks every rank's heads together with one all-gather per layer
    (:meth:`~kvprune.caches.kvzip.KVzipCache.compress`), so ranks evict alike. Every other argument as
    :func:`kvprune.make_cache`; ``kv_bits`` is not supported yet (a typed error).
    """
    check_architecture(model.config)
    if kv_bits is not None:
        parse_kv_bits(kv_bits)  # an invalid value says what is valid
        raise InvalidParameterError("kvzip does not combine with kv_bits yet; drop kv_bits or pick another policy")
    config = configure(KVzip, policy, params)
    replay_prompts(tokenizer, config)  # a typed error for a wrong tokenizer, before anything runs
    cache = KVzipCache(config, budget, config=model.config, prefill_only=prefill_only, evict_every=evict_every)
    cache.tokenizer = tokenizer
    cache.step_forward = kvzip_step  # run by the wrapped decoder forward as step(base, cache, ids, mask, pos, embeds)
    prepare_model(model, backend)
    prepare_stepwise(model)
    return cache
