"""Slow SpAtten reference from the paper's rules (Algorithm 1 and the head-pruning rule), on eager weights.

It never removes anything: the plain eager model runs with ``DynamicCache``; a pre-hook masks, per
layer, the keys of tokens pruned at or before it; a pre-hook on ``o_proj`` zeroes the outputs of
pruned heads (and reads their L1 magnitudes); a forward hook reads the attention probabilities.
Scores and cascade decisions are plain Python loops over tokens and heads.
"""

from __future__ import annotations

import math

import torch
from reference import on_grid
from transformers import DynamicCache


class SpAttenReference:
    """``depth[r][t]`` (layers holding token t) and ``head_depth[r][h]`` from the paper's rules."""

    def __init__(self, model, token_schedule: list[float], head_schedule: list[float], recent: int = 0):
        self.model, self.tok_p, self.head_p, self.recent = model, token_schedule, head_schedule, recent
        cfg = model.config
        self.n_layers, self.hq = cfg.num_hidden_layers, cfg.num_attention_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.hq
        self.cache = DynamicCache()
        self.valid: list[list[bool]] = []
        self.depth: list[list[int]] = []
        self.score: list[list[float]] = []
        self.head_depth: list[list[int]] = []
        self.head_score: list[list[float]] = []
        self.q = 0
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.register_forward_pre_hook(self._mask_hook(i), with_kwargs=True)
            layer.self_attn.o_proj.register_forward_pre_hook(self._head_hook(i))
            layer.self_attn.register_forward_hook(self._probs_hook(i))
            layer.register_forward_hook(self._prune_hook(i))

    def _present_query(self, r: int, j: int, i: int) -> bool:
        t = len(self.valid[r]) - self.q + j
        return self.valid[r][t] and self.depth[r][t] > i

    def _mask_hook(self, i):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"]
            b, q = hidden.shape[:2]
            s = len(self.valid[0])
            mask = torch.full((b, 1, q, s), float("-inf"), dtype=hidden.dtype)
            for r in range(b):
                for j in range(q):
                    qt = s - q + j
                    for t in range(qt + 1):
                        if (self.valid[r][t] and self.depth[r][t] > i) or t == qt:
                            mask[r, 0, j, t] = 0.0
            kwargs["attention_mask"] = mask
            return args, kwargs

        return hook

    def _head_hook(self, i):
        def hook(module, args):
            (x,) = args
            x = x.clone()
            for r in range(x.shape[0]):
                for h in range(self.hq):
                    part = x[r, :, h * self.d : (h + 1) * self.d]
                    if self.head_depth[r][h] <= i:
                        part.zero_()  # a pruned head contributes nothing
                        continue
                    for j in range(x.shape[1]):
                        if self._present_query(r, j, i):
                            self.head_score[r][h] += float(part[j].detach().abs().sum())
            return (x,)

        return hook

    def _probs_hook(self, i):
        def hook(module, args, output):
            w = output[1].detach().double()  # [B, Hq, q, S]
            for r in range(w.shape[0]):
                for h in range(self.hq):
                    if self.head_depth[r][h] <= i:
                        continue
                    for j in range(w.shape[2]):
                        if not self._present_query(r, j, i):
                            continue
                        for t in range(w.shape[3]):
                            if self.valid[r][t] and self.depth[r][t] > i:
                                self.score[r][t] += float(w[r, h, j, t])

        return hook

    def _prune_hook(self, i):
        def hook(module, args, output):
            if i >= self.n_layers - 1:
                return
            for r in range(len(self.valid)):
                n_valid = sum(self.valid[r])
                p = self.tok_p[i]
                if p > 0:
                    real = [t for t in range(len(self.valid[r])) if self.valid[r][t]]
                    forced = set(real[-max(1, self.recent):]) | {len(self.valid[r]) - 1}  # newest (and recent) tokens
                    cands = [t for t in real if self.depth[r][t] > i + 1]
                    keep = max(math.floor(n_valid * (1 - p)), 1, len(forced & set(cands)))
                    # highest cumulative importance first, forced tokens always, ties to the older token
                    order = sorted(cands, key=lambda t: (t not in forced, -on_grid(self.score[r][t]), t))
                    for t in order[keep:]:
                        self.depth[r][t] = i + 1
                ph = self.head_p[i]
                if ph > 0:
                    keep = max(1, math.floor(self.hq * (1 - ph)))
                    cands = [h for h in range(self.hq) if self.head_depth[r][h] > i + 1]
                    order = sorted(cands, key=lambda h: (-on_grid(self.head_score[r][h]), h))
                    for h in order[keep:]:
                        self.head_depth[r][h] = i + 1

        return hook

    def forward(self, input_ids, attention_mask, position_ids):
        b, q = input_ids.shape
        if not self.valid:
            self.valid = [[] for _ in range(b)]
            self.depth = [[] for _ in range(b)]
            self.score = [[] for _ in range(b)]
            self.head_depth = [[self.n_layers] * self.hq for _ in range(b)]
            self.head_score = [[0.0] * self.hq for _ in range(b)]
        for r in range(b):
            for v in attention_mask[r, -q:].tolist():
                self.valid[r].append(bool(v))
                self.depth[r].append(self.n_layers if v else 0)
                self.score[r].append(0.0)
        self.q = q
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=self.cache, use_cache=True)
        return out.logits
