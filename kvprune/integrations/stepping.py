"""What the step-by-step forwards of LazyLLM and SpAtten share: a step's inputs and left-packing of selections."""

from __future__ import annotations

import torch


def pack_left(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Positions where ``mask [B, T]`` is true, ascending, left-padded with -1 to the widest row; and whether
    any row needed padding."""
    counts = mask.sum(-1)
    width = int(counts.max())
    if bool((counts == width).all()):  # no padding needed (always so for one row): nonzero is row-major, ascending
        packed = mask.nonzero()[:, 1].view(mask.shape[0], width)
        return packed, torch.ones_like(packed, dtype=torch.bool), False
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    packed = torch.where(mask, pos, -1).sort(dim=-1).values[:, mask.shape[1] - width :]
    return packed, packed >= 0, True


def step_inputs(
    base: torch.nn.Module,
    n_seen: int,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's new tokens as ``(embeddings [B, q, D] (a fresh tensor), real [B, q], RoPE positions [B, q])``."""
    embeds = base.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.clone()
    b, q, _ = embeds.shape
    if attention_mask is None:
        valid = torch.ones((b, q), dtype=torch.bool, device=embeds.device)
    else:
        valid = attention_mask[:, -q:].to(torch.bool)
    if position_ids is None:
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]
        else:
            position_ids = torch.arange(n_seen, n_seen + q, device=embeds.device)
    return embeds, valid, position_ids.expand(b, q).to(embeds.device)
