"""LazyLLM's layer-skipping forward for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3).

Per step, per layer: gather the hidden states of the selected tokens that still need this layer
(the new tokens, and revived tokens resuming from the Aux Cache), run the real decoder layer on
just those, and after each pruning layer drop the least attended tokens from the selection; the
states go back to the Aux Cache when the set changes (they stay packed across layers where it
does not). So the saving is real compute, and each token is computed at most once
per layer over the whole generation.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..caches.lazy import LazyCache
from ..errors import InvalidParameterError
from ..policies import build_config
from ..policies.lazyllm import LazyLLM
from .compat import base_output, with_cache
from .forward import prepare_stepwise
from .prepare import check_architecture, prepare_model
from .stepping import pack_left, step_inputs


@torch.no_grad()
def lazy_forward(
    base: torch.nn.Module,
    cache: LazyCache,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> BaseModelOutputWithPast:
    """One step of LazyLLM through ``base`` (the decoder stack, e.g. ``LlamaModel``).

    Returns the final hidden states of the new tokens; a new token pruned before the last layer
    (only possible for non-final prompt tokens) has NaN there, since it was never computed.
    """
    embeds, valid, position_ids = step_inputs(base, cache.n_seen, input_ids, attention_mask, position_ids, inputs_embeds)
    b, q, d = embeds.shape
    cache.append_tokens(embeds, valid, position_ids)

    n_tokens = cache.n_seen
    selected = cache.token_valid.clone()  # every step starts again from the full context
    newest = torch.zeros_like(selected)
    newest[:, -1] = True
    rows = torch.arange(b, device=embeds.device)[:, None]
    schedule = cache.decode_schedule if q == 1 else cache.schedule
    # the token set computed at the previous layer: its states stay packed (hidden, at qpos) while it is unchanged
    carried: torch.Tensor | None = None
    hidden = qvalid = bi = pi = torch.empty(0)
    for idx, layer in enumerate(base.layers[: len(cache.layers)]):
        todo = selected & (cache.depth == idx)
        if carried is None or not torch.equal(todo, carried):
            if carried is not None:
                cache.hidden[bi, pi] = hidden[qvalid].to(cache.hidden.dtype)
            qpos, qvalid, padded = pack_left(todo)
            src = qpos.clamp(min=0)
            hidden = cache.hidden.gather(1, src[..., None].expand(-1, -1, d))
            rope = cache.rope_pos.gather(1, src)
            position_embeddings = base.rotary_emb(hidden, rope)
            bi, pi = rows.expand_as(qpos)[qvalid], qpos[qvalid]
        lazy_layer = cache.layers[idx]
        # the newest token alone (a decoding step, nothing revived here): all keys are at or before it
        newest_only = q == 1 and qpos.shape[1] == 1 and not padded
        lazy_layer.begin(qpos, qvalid, selected, idx in schedule, newest_only=newest_only, padded=padded)
        out = layer(
            hidden,
            attention_mask=None,
            position_ids=rope,
            **with_cache(cache),
            use_cache=True,
            position_embeddings=position_embeddings,
        )
        hidden = out[0] if isinstance(out, tuple) else out
        cache.depth[bi, pi] += 1
        cache.computed[bi, pi, idx] += 1
        carried = todo
        if idx in schedule:
            selected = cache.policy.select(lazy_layer.importance, selected, newest, schedule[idx])
    if carried is not None:
        cache.hidden[bi, pi] = hidden[qvalid].to(cache.hidden.dtype)

    last = len(cache.layers)
    final = cache.hidden[:, n_tokens - q :]
    done = (cache.depth[:, n_tokens - q :] == last)[..., None]
    final = torch.where(done, base.norm(final), torch.full_like(final, float("nan")))
    return base_output(final, cache)


def make_lazy_cache(model: torch.nn.Module, policy: LazyLLM | str | None = None, budget: None = None, *,
                    backend: str | None = None, **params: Any) -> LazyCache:
    """Prepare ``model`` for LazyLLM and return a fresh :class:`LazyCache` (one per conversation)."""
    check_architecture(model.config)
    if budget is not None:
        raise InvalidParameterError("LazyLLM prunes computation, not memory: it takes no budget (pass budget=None)")
    if isinstance(policy, LazyLLM):
        if params:
            raise InvalidParameterError("pass parameters either to the LazyLLM object or by name, not both")
    else:
        policy = build_config(LazyLLM, params)
    cache = LazyCache(policy, model.config.num_hidden_layers)  # validates the schedule before the model changes
    cache.step_forward = lazy_forward
    prepare_model(model, backend)
    prepare_stepwise(model)
    return cache
