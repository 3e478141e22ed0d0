"""The selective-layer loop LazyLLM and SpAtten drive: each decoder layer runs on only the tokens chosen for it.

Per layer: the method says which tokens this layer computes (``todo``); their hidden states are gathered,
packed left per row (ascending position, padded with -1), run through the real decoder layer against the
cache, and written back. While the chosen set does not change from one layer to the next, the states stay
packed (no gather/scatter between those layers). After each layer the method updates its state -- where
LazyLLM and SpAtten prune.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..caches.contract import StepContext
from .compat import base_output, with_cache
from .stepping import pack_left


class SelectiveStep(Protocol):
    """One step of a method through the decoder stack, as the loop asks it."""

    #: every layer computes the tokens layer 0 computes (nothing prunes or revives this step): ``todo`` is asked once
    uniform: bool

    def todo(self, idx: int) -> torch.Tensor:
        """``[B, T]`` bool: the tokens (indices into the loop's states) layer ``idx`` computes now."""

    def context(self, idx: int, query_positions: torch.Tensor, query_valid: torch.Tensor, padded: bool) -> StepContext:
        """What layer ``idx`` of the cache is told before it runs (positions are logical, -1: padding)."""

    def after(self, idx: int, step: StepContext, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Layer ``idx`` computed ``(rows, tokens)`` (indices into the states): count, prune."""


def run_layers(base: torch.nn.Module, cache, method: SelectiveStep, states: torch.Tensor, rope_pos: torch.Tensor,
               offset: int = 0) -> None:
    """Run every decoder layer of ``base`` on the tokens ``method`` chooses; updates ``states [B, T, D]`` in place.

    ``rope_pos [B, T]`` are the tokens' RoPE positions; a token's logical position is its index plus ``offset``.
    """
    b, _, d = states.shape
    rows = torch.arange(b, device=states.device)[:, None]
    carried: torch.Tensor | None = None  # the token set computed at the previous layer (states still packed)
    hidden = qvalid = bi = ti = qpos = rope = position_embeddings = None
    padded = False
    uniform = method.uniform
    for idx, layer in enumerate(base.layers[: len(cache.layers)]):
        todo = carried if carried is not None and uniform else method.todo(idx)
        if carried is None or (todo is not carried and not torch.equal(todo, carried)):
            if carried is not None:
                states[bi, ti] = hidden[qvalid].to(states.dtype)
            local, qvalid, padded = pack_left(todo)
            src = local.clamp(min=0)
            hidden = states.gather(1, src[..., None].expand(-1, -1, d))
            rope = rope_pos.gather(1, src)
            position_embeddings = base.rotary_emb(hidden, rope)
            bi, ti = rows.expand_as(local)[qvalid], local[qvalid]
            qpos = torch.where(qvalid, local + offset, -1) if offset else local
        step = method.context(idx, qpos, qvalid, padded)
        cache.layers[idx].begin(step)
        out = layer(hidden, attention_mask=None, position_ids=rope, **with_cache(cache), use_cache=True,
                    position_embeddings=position_embeddings)
        hidden = out[0] if isinstance(out, tuple) else out
        method.after(idx, step, bi, ti)
        carried = todo
    if carried is not None:
        states[bi, ti] = hidden[qvalid].to(states.dtype)


def final_output(base: torch.nn.Module, cache, states: torch.Tensor, done: torch.Tensor) -> BaseModelOutputWithPast:
    """The new tokens' normed final states; NaN for a token that stopped before the last layer (never computed)."""
    final = torch.where(done[..., None], base.norm(states), torch.full_like(states, float("nan")))
    return base_output(final, cache)
