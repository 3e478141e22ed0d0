"""Slow references written from the papers' equations, run on eager attention weights.

The reference never removes a token: it runs the model with ``DynamicCache`` and eager attention,
masks each layer's evicted tokens per head with a 4D mask injected by a pre-hook (masking a key is
exactly evicting it), reads the attention weights with a forward hook, and updates scores and
keep-sets with plain Python loops over tokens. Float64 models keep ties out of the comparison.
"""

from __future__ import annotations

import math

import torch
from transformers import DynamicCache

from kvprune.policies import (
    A2SF,
    H2O,
    TOVA,
    KeyDiff,
    KNorm,
    ObservedAttention,
    Policy,
    RandomPolicy,
    SnapKV,
    StreamingLLM,
)
from kvprune.policies.random import hash_uniform


class Reference:
    """Keep-sets per (layer, row, KV head) as sets of logical positions, from the paper's rule."""

    def __init__(self, model, policy: Policy, budget: int):
        self.model, self.policy, self.budget = model, policy, budget
        cfg = model.config
        self.n_layers, self.hq, self.hkv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
        self.g = self.hq // self.hkv
        self.cache = DynamicCache()
        self.valid: list[list[bool]] | None = None  # per row, per logical position
        self.kept: list = []  # [layer][row][head] -> set of positions
        self.scores: list = []  # [layer][row][head] -> {pos: float}
        self.weights: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True)
            layer.self_attn.register_forward_hook(self._post_hook(i))

    # -- hooks ----------------------------------------------------------------------------------
    def _pre_hook(self, i):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"]
            b, q = hidden.shape[:2]
            s = len(self.valid[0])
            mask = torch.full((b, self.hq, q, s), float("-inf"), dtype=hidden.dtype)
            for r in range(b):
                for h in range(self.hq):
                    kept = self.kept[i][r][h // self.g] if self.kept else set()
                    for j in range(q):
                        qpos = s - q + j
                        for k in range(qpos + 1):
                            new = k >= s - q
                            if (self.valid[r][k] and (new or k in kept)) or k == qpos:
                                mask[r, h, j, k] = 0.0
            kwargs["attention_mask"] = mask
            return args, kwargs

        return hook

    def _post_hook(self, i):
        def hook(module, args, output):
            self.weights[i] = output[1].detach().double()
            self.keys[i] = self.cache.layers[i].keys.detach().double()

        return hook

    # -- one forward ----------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, position_ids):
        b, q = input_ids.shape
        if self.valid is None:
            self.valid = [[] for _ in range(b)]
            self.kept = [[[set() for _ in range(self.hkv)] for _ in range(b)] for _ in range(self.n_layers)]
            self.scores = [[[{} for _ in range(self.hkv)] for _ in range(b)] for _ in range(self.n_layers)]
        for r in range(b):
            self.valid[r] += [bool(v) for v in attention_mask[r, -q:]]
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=self.cache, use_cache=True,
        )
        for i in range(self.n_layers):
            self._update_layer(i, q)
        return out.logits

    def _rank(self, r):
        ranks, n = {}, 0
        for p, v in enumerate(self.valid[r]):
            if v:
                ranks[p] = n
                n += 1
        return ranks, n

    def _update_layer(self, i, q):
        s = len(self.valid[0])
        new = list(range(s - q, s))
        w = self.weights[i]  # [B, Hq, q, S]
        pol = self.policy
        for r in range(len(self.valid)):
            ranks, n_valid = self._rank(r)
            for h in range(self.hkv):
                kept, sc = self.kept[i][r][h], self.scores[i][r][h]
                for p in new:
                    if self.valid[r][p]:
                        kept.add(p)
                        sc[p] = self._initial(i, r, h, p, ranks[p])
                # group-mean attention rows of this KV head, valid queries only
                rows = []
                for j in range(q):
                    if self.valid[r][s - q + j]:
                        row = {k: float(w[r, h * self.g : (h + 1) * self.g, j, k].mean()) for k in kept}
                        rows.append((j, row))
                self._score(sc, kept, rows, q, w, r, i)
                cap = self.budget
                if len(kept) > cap:
                    if isinstance(pol, StreamingLLM):  # the sinks and the newest cap - n_sink tokens, nothing scored
                        recent = cap - pol.n_sink
                    else:
                        recent = max(int(pol.recent_tokens(torch.tensor([cap]))[0]), 1)
                    prot = {p for p in kept if ranks[p] < pol.n_sink or ranks[p] >= n_valid - recent}
                    rank_by = self._eviction_rule(i, r, h, kept, sc, ranks, n_valid)
                    # scores agreeing to 10 significant bits are ties; ties: older token first
                    others = sorted(kept - prot, key=lambda p: (-on_grid(rank_by[p]), p))
                    kept &= prot | set(others[: cap - len(prot)])
                    for p in list(sc):
                        if p not in kept:
                            del sc[p]

    def _eviction_rule(self, i, r, h, kept, sc, ranks, n_valid):
        """What the eviction ranks tokens by: the score, unless the rule needs the whole kept set."""
        pol = self.policy
        if isinstance(pol, SnapKV) and pol.kernel_size > 1:  # max-pool over neighbouring kept tokens, by position
            slots = sorted(kept)
            half = pol.kernel_size // 2
            pool = max if pol.pooling == "max" else (lambda xs: sum(xs) / pol.kernel_size)  # zero padding at the edges
            return {k: pool([sc[x] for x in slots[max(0, j - half) : j + half + 1]]) for j, k in enumerate(slots)}
        if isinstance(pol, ObservedAttention):  # mean attention: the sum over the n - rank queries that saw it
            return {p: sc[p] / (n_valid - ranks[p]) for p in kept}
        if isinstance(pol, KeyDiff):  # -cos(k, mean of the kept unit keys)
            keys = {p: self.keys[i][r, h, p].tolist() for p in kept}
            units = {p: [x / math.sqrt(sum(y * y for y in k)) for x in k] for p, k in keys.items()}
            d = len(next(iter(units.values())))
            anchor = [sum(u[j] for u in units.values()) / len(units) for j in range(d)]
            norm_a = math.sqrt(sum(a * a for a in anchor))
            return {p: -sum(x * a for x, a in zip(u, anchor)) / norm_a for p, u in units.items()}
        return sc

    def _initial(self, i, r, h, p, rank):
        pol = self.policy
        if isinstance(pol, KNorm):
            return -float(self.keys[i][r, h, p].norm())
        if isinstance(pol, RandomPolicy):
            return float(hash_uniform(pol.seed, i, torch.tensor(h), torch.tensor(rank)))
        return 0.0

    def _score(self, sc, kept, rows, q, w, r, i):
        pol = self.policy
        if isinstance(pol, (A2SF, H2O)):
            alpha = pol.alpha if isinstance(pol, A2SF) else 1.0
            row_of = dict(rows)
            for j in range(q):  # A_n = alpha * A_{n-1} + S_n, one query step at a time
                for k in kept:
                    sc[k] = alpha * sc[k] + row_of.get(j, {}).get(k, 0.0)
        elif isinstance(pol, TOVA):  # newest query, averaged over all heads of the layer
            for k in kept:
                sc[k] = float(w[r, :, q - 1, k].mean())
        elif isinstance(pol, SnapKV):  # the window's votes (pooled when ranking, see _eviction_rule)
            win = [row for j, row in rows if j >= q - pol.window]
            for k in kept:
                sc[k] = sum(row[k] for row in win)


def on_grid(x: float, bits: int = 10) -> float:
    """``x`` rounded to ``bits`` significant bits, half away from zero (the documented ranking grid)."""
    if x == 0 or not math.isfinite(x):
        return x
    m, e = math.frexp(abs(x))  # abs(x) = m * 2**e, m in [0.5, 1)
    return math.copysign(math.floor(m * 2**bits + 0.5) / 2**bits * 2.0**e, x)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Generate's positions for left padding: index among the row's real tokens."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def kept_positions(layer, r: int, h: int) -> set[int]:
    """Valid positions a kvprune layer holds for row ``r``, KV head ``h``."""
    return {int(p) for p, v in zip(layer.positions[r, h], layer.valid[r, h]) if v}


__all__ = ["Reference", "kept_positions", "on_grid", "position_ids_from_mask"]
