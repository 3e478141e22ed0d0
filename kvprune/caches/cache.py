"""The transformers-facing cache: one :class:`PruningLayer` per decoder layer, one policy, one budget."""

from __future__ import annotations

import sys
from typing import Any

import torch
from transformers import PretrainedConfig

from ..errors import CacheUsageError, InvalidBudgetError, InvalidParameterError
from ..policies import Policy, build_policy
from .base import KVCache
from .budget import Budget
from .decode import DeferredEvictions
from .layer import PruningLayer
from .stacked import StackedSlots

#: attention implementations whose names start with this route through kvprune
ATTN_PREFIX = "kvprune_"


class PruningCache(KVCache):
    """A ``transformers`` cache that keeps each layer within ``budget`` using ``policy``.

    ``policy`` is a name (``"a2sf"``, ``"h2o"``, ...) with its parameters as keyword arguments, or a
    :class:`~kvprune.policies.Policy`. ``budget`` is slots per (row, KV head): an int, or a float
    ratio of the tokens seen. ``evict_every=k`` evicts at one-token steps only at every k-th one since the last
    multi-token forward (the prompt, which always evicts), a block at once: a row then holds at most
    ``budget + k - 1`` slots, and exactly its budget after every k-th step. The model must be prepared
    (``kvprune.prepare_model``) so that its attention reaches kvprune; ``kvprune.make_cache(model, ...)`` does both.
    """

    def __init__(
        self,
        policy: str | Policy = "full",
        budget: int | float | Budget | None = None,
        *,
        config: PretrainedConfig | None = None,
        num_layers: int | None = None,
        prefill_only: bool = False,
        evict_every: int = 1,
        **policy_params: Any,
    ) -> None:
        self.policy = build_policy(policy, **policy_params)
        self.budget = Budget.parse(budget)
        if self.policy.evicts and self.budget is None:
            raise InvalidBudgetError(
                f"policy {self.policy.name!r} needs a budget: an int token count >= {self.policy.min_budget()} "
                "or a float ratio in (0, 1) of the tokens seen (policy='full' needs none)"
            )
        if not self.policy.evicts and self.budget is not None:
            raise InvalidBudgetError(
                f"policy {self.policy.name!r} keeps every token and takes no budget; pass budget=None, or pick an "
                "evicting policy to hold the cache to a budget"
            )
        if self.budget is not None:
            self.budget.check_room(self.policy.min_budget(), self.policy.name)
        self.config = config
        if config is not None:
            num_layers = getattr(config.get_text_config(decoder=True), "num_hidden_layers", None)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise InvalidParameterError(
                f"pass config=model.config or num_layers=<int >= 1> to size the cache; got num_layers={num_layers!r}"
            )
        if not isinstance(prefill_only, bool):
            raise InvalidParameterError(f"prefill_only is True or False; got {prefill_only!r}")
        if isinstance(evict_every, bool) or not isinstance(evict_every, int) or not 1 <= evict_every <= 4096:
            raise InvalidParameterError(f"evict_every is an integer number of decode steps in 1..4096; got {evict_every!r}")
        self.prefill_only = prefill_only
        self.evict_every = evict_every
        super().__init__(layers=[self.make_layer(i) for i in range(num_layers)])
        deferred = DeferredEvictions(num_layers)  # decode evictions of every layer, chosen together
        stacked = StackedSlots(num_layers)  # and made with one op per kind in buffers shared by the layers
        for layer in self.layers:
            layer.prefill_only = prefill_only
            layer.evict_every = evict_every
            layer.deferred = deferred
            layer.stacked = stacked

    def make_layer(self, layer_idx: int) -> PruningLayer:
        """The storage of one decoder layer (a subclass of the cache picks its own layer kind here)."""
        return PruningLayer(layer_idx, self.policy, self.budget)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # the attention module calling us says which attention function runs next; if it is not kvprune's,
        # nothing would evict after this forward, so refuse before anything is stored (once per forward: layer 0)
        config = None
        if layer_idx == 0:
            caller = None if torch.compiler.is_compiling() else sys._getframe(1).f_locals.get("self")
            config = getattr(caller, "config", None) if isinstance(caller, torch.nn.Module) else None
            config = config if config is not None else self.config
        if config is not None:
            impl = str(getattr(config, "_attn_implementation", None))
            if not impl.startswith(ATTN_PREFIX):
                raise CacheUsageError(
                    f"the model's attention implementation is {impl!r}, so kvprune cannot see its attention; "
                    "call kvprune.prepare_model(model) first or build the cache with kvprune.make_cache(model, ...)"
                )
        if layer_idx >= len(self.layers):
            raise InvalidParameterError(f"layer index {layer_idx} is out of range for a cache of {len(self.layers)} layers")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_mask_sizes(self, query_length: int | torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        """Both transformers signatures: ``(query_length, layer_idx)`` (>= 5.3) and ``(cache_position, layer_idx)``."""
        return self.layers[min(layer_idx, len(self.layers) - 1)].get_mask_sizes(query_length)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def __repr__(self) -> str:
        once = ", prefill_only=True" if self.prefill_only else ""
        once += f", evict_every={self.evict_every}" if self.evict_every != 1 else ""
        return f"PruningCache(policy={self.policy!r}, budget={self.budget!r}{once}, layers={len(self.layers)})"
