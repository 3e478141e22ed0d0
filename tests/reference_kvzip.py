"""A slow reference of KVzip (arXiv 2505.23416), written from Algorithm 1 and Eq. 2 on eager attention weights.

One row, no padding, a plain ``DynamicCache``: prefill the context; for each chunk ``c_t`` forward the replay
input against a copy of the cache (so its keys and values are discarded) with ``output_attentions=True``;
restrict each replay query's softmax row to the sub-sampled keys (the ``n_sink`` first tokens, chunk ``c_t``,
the replay's own tokens) and renormalise it -- a softmax over a subset of the keys is the full softmax divided
by its mass on the subset -- and take ``S[l, h, j] = max`` over the group's query heads and the replay's
queries for each ``j`` in ``c_t``. Eviction: per (layer, KV head) keep the ``cap`` highest scores, or per row the
``cap x heads x layers`` highest over every head and layer; the sinks and the newest token are always kept; on a
tie the older token wins. Nothing here imports kvprune's attention path.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache


def replay_inputs(ids: list[int], chunk: int, carry: int, prompts: tuple[list[int], list[int], list[int]] | None):
    """``[(replay ids, first context index, end)]``: instruction + turn end + chunk (later chunks quote the tail)."""
    out = []
    for t, lo in enumerate(range(0, len(ids), chunk)):
        c = ids[lo : lo + chunk]
        prev = ids[max(0, lo - carry) : lo] if t > 0 and carry > 0 else []
        if prompts is None:
            head = prev
        else:
            first, later, tail = prompts
            head = (first if t == 0 else later + prev) + tail
        out.append((head + c, lo, lo + len(c)))
    return out


@torch.no_grad()
def kvzip_scores(eager_model, ids: list[int], chunk: int, carry: int, n_sink: int,
                 prompts: tuple[list[int], list[int], list[int]] | None = None) -> torch.Tensor:
    """Scores ``[L, Hkv, n]`` of the context ``ids`` (Algorithm 1)."""
    cfg = eager_model.config
    n = len(ids)
    hkv, g = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    cache = DynamicCache()
    eager_model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    scores = torch.zeros((cfg.num_hidden_layers, hkv, n), dtype=torch.float64)
    for replay, lo, hi in replay_inputs(ids, chunk, carry, prompts):
        m = len(replay)
        out = eager_model(input_ids=torch.tensor([replay]), past_key_values=copy.deepcopy(cache), use_cache=True,
                          position_ids=torch.arange(n, n + m)[None], output_attentions=True)
        cols = torch.tensor(sorted({*range(min(n_sink, n)), *range(lo, hi), *range(n, n + m)}))
        chunk_cols = [k for k, c in enumerate(cols.tolist()) if lo <= c < hi]
        for layer, a in enumerate(out.attentions):  # [1, Hq, m, n + m]
            sub = a[0].double()[..., cols]
            sub = sub / sub.sum(-1, keepdim=True)
            best = sub.view(hkv, g, m, -1).amax(dim=(1, 2))  # max over the group's heads and the replay's queries
            scores[layer, :, lo:hi] = best[:, chunk_cols]
    return scores


def _grid(x: torch.Tensor) -> torch.Tensor:
    """Scores compared as kvprune's eviction compares them (10 significant bits), so float noise cannot flip a tie."""
    from kvprune.policies.base import rank_grid

    return rank_grid(x.float())


def keep_sets(scores: torch.Tensor, cap: int, n_sink: int, scope: str = "head") -> list[list[set[int]]]:
    """Kept context indices per layer and KV head."""
    layers, hkv, n = scores.shape
    eff = _grid(scores).clone()
    protected = torch.zeros(n, dtype=torch.bool)
    protected[: min(n_sink, n)] = True
    protected[n - 1] = True
    eff[..., protected] = float("inf")
    if scope == "head":
        keep = []
        for layer in range(layers):
            row = []
            for h in range(hkv):
                order = sorted(range(n), key=lambda j: (-eff[layer, h, j].item(), j))
                row.append(set(order[: min(cap, n)]))
            keep.append(row)
        return keep
    flat = [(-eff[layer, h, j].item(), layer, h, j) for layer in range(layers) for h in range(hkv) for j in range(n)]
    chosen = sorted(flat)[: min(cap, n) * layers * hkv]
    keep = [[set() for _ in range(hkv)] for _ in range(layers)]
    for _, layer, h, j in chosen:
        keep[layer][h].add(j)
    return keep
