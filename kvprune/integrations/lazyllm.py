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

from ..caches.contract import StepContext
from ..caches.lazy import LazyCache
from ..errors import InvalidParameterError
from ..policies import configure
from ..policies.lazyllm import LazyLLM
from .factories import builds, refuse_schedule
from .forward import prepare_stepwise
from .prepare import check_architecture, prepare_model
from .quantized import check_kv_bits
from .selective import final_output, run_layers
from .stepping import step_inputs


class _LazyStep:
    """LazyLLM at one step: a layer computes the selected tokens that have not reached it yet (new tokens and
    tokens revived from the Aux Cache); after each pruning layer the least attended leave the selection."""

    def __init__(self, cache: LazyCache, n_queries: int) -> None:
        self.cache = cache
        self.selected = cache.token_valid.clone()  # every step starts again from the full context
        self.all_selected = bool(self.selected.all())  # no key is masked out until a pruning layer
        self.newest = torch.zeros_like(self.selected)
        self.newest[:, -1] = True
        self.decoding = n_queries == 1
        schedule = cache.decode_schedule if self.decoding else cache.schedule
        self.schedule = {idx: r for idx, r in schedule.items() if r > 0}  # a ratio of 0 prunes nothing: no observation
        self.n_layers = len(cache.layers)
        # a decoding step that prunes nowhere, with every earlier token through every layer: each layer computes
        # just the newest token, so the loop skips the per-layer token bookkeeping (counted once, at the end)
        done = (cache.depth[:, :-1] == self.n_layers) | ~cache.token_valid[:, :-1]
        self.uniform = self.decoding and not self.schedule and bool(done.all())
        device = self.selected.device
        self._one, self._one_i32 = torch.ones((), dtype=torch.long, device=device), torch.ones((), dtype=torch.int32, device=device)

    def todo(self, idx: int) -> torch.Tensor:
        return self.selected & (self.cache.depth == idx)

    def context(self, idx: int, query_positions: torch.Tensor, query_valid: torch.Tensor, padded: bool) -> StepContext:
        # the newest token alone (a decoding step, nothing revived here): all keys are at or before it
        newest_only = self.decoding and query_positions.shape[1] == 1 and not padded
        # the last layer of a decoding step: tokens revived there are computed for their keys and values only
        read_only = self.cache.n_seen - 1 if self.decoding and idx == self.n_layers - 1 and not newest_only else None
        return StepContext(query_positions, query_valid, selected=self.selected, observe=idx in self.schedule,
                           newest_only=newest_only, padded=padded, all_selected=self.all_selected,
                           read_only=read_only)

    def after(self, idx: int, step: StepContext, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        if self.uniform:  # the same tokens at every layer: count them once, after the last
            if idx == self.n_layers - 1:
                self.cache.depth.index_put_((rows, tokens), self._one * self.n_layers, accumulate=True)
                self.cache.computed.index_put_((rows, tokens), self._one_i32, accumulate=True)
            return
        self.cache.depth.index_put_((rows, tokens), self._one, accumulate=True)
        self.cache.computed[:, :, idx].index_put_((rows, tokens), self._one_i32, accumulate=True)
        if step.observe:
            self.selected = self.cache.policy.select(step.importance, self.selected, self.newest, self.schedule[idx])
            self.all_selected = False


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
    q = embeds.shape[1]
    cache.append_tokens(embeds, valid, position_ids)
    run_layers(base, cache, _LazyStep(cache, q), cache.hidden, cache.rope_pos)
    new = slice(cache.n_seen - q, cache.n_seen)
    return final_output(base, cache, cache.hidden[:, new], cache.depth[:, new] == len(cache.layers))


@builds(LazyLLM)
def make_lazy_cache(model: torch.nn.Module, policy: LazyLLM | str | None = None, budget: None = None, *,
                    backend: str | None = None, prefill_only: bool = False, evict_every: int = 1,
                    kv_bits: object = None, **params: Any) -> LazyCache:
    """Prepare ``model`` for LazyLLM and return a fresh :class:`LazyCache` (one per conversation)."""
    check_architecture(model.config)
    if budget is not None:
        raise InvalidParameterError("LazyLLM prunes computation, not memory: it takes no budget (pass budget=None)")
    refuse_schedule("LazyLLM", prefill_only, evict_every)
    check_kv_bits(kv_bits, "lazyllm", "LazyLLM keeps a full cache (it saves compute, not memory) and has no quantized "
                  "storage yet")
    policy = configure(LazyLLM, policy, params)
    cache = LazyCache(policy, model.config.num_hidden_layers)  # validates the schedule before the model changes
    cache.step_forward = lazy_forward
    prepare_model(model, backend)
    prepare_stepwise(model)
    return cache
