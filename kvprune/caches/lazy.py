"""LazyLLM's cache: per-layer KV of the tokens computed there, plus the Aux Cache of hidden states.

Each token has a depth: the number of layers it has been computed through. Its KV exists in
layers ``< depth`` and ``hidden[row, position]`` holds its hidden state at the input of layer
``depth`` (the Aux Cache: where a pruned token resumes when it is selected again). Tokens are
stored in the order they were computed, so a layer's slots are not sorted by position; masks
are built from positions.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import BatchMismatchError, CacheUsageError
from ..policies.lazyllm import LazyLLM
from .contract import OrderedQueries, StepContext, bind
from .base import check_layout
from .stepwise import StepwiseCache, StepwiseLayer, append_along


class LazyLayer(StepwiseLayer):
    """KV of the tokens computed at one layer; the lazy forward says which queries come and which keys count."""

    METHOD = "LazyLLM"
    heads_aligned = True  # one token set per row, shared by the heads
    all_valid = False  # always build the mask (selection changes per step)
    own_attention = None  # the shared attention path

    def __init__(self, layer_idx: int, policy: LazyLLM) -> None:
        super().__init__()
        self.layer_idx, self.policy = layer_idx, policy
        self.reset()

    def reset(self) -> None:
        self.keys = self.values = None
        self.positions: torch.Tensor | None = None  # [B, N] logical position of each slot (-1: padding)
        self.valid: torch.Tensor | None = None  # [B, N]
        self.pending = 0
        self.step: StepContext | None = None  # this step's queries and selection, set by the lazy forward
        self._holes = False  # whether a padding slot may be held (compact() has nothing to do otherwise)
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.positions = torch.empty((b, 0), dtype=torch.long, device=self.device)
        self.valid = torch.empty((b, 0), dtype=torch.bool, device=self.device)
        self.is_initialized = True

    def begin(self, step: StepContext) -> None:
        """Called by the lazy forward before the layer runs: this step's queries and selection."""
        self.step = step
        self._holes = self._holes or step.padded  # padding slots appended: compaction may have work

    @property
    def frozen(self) -> bool:
        """The attention observes only at layers after which the step prunes."""
        return self.step is None or not self.step.observe

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        check_layout(self.layer_idx, self.keys, self.values, key_states, value_states)
        append_along(self, "keys", key_states, dim=2)
        append_along(self, "values", value_states, dim=2)
        append_along(self, "positions", self.step.query_positions, dim=1)
        append_along(self, "valid", self.step.query_valid, dim=1)
        self.pending = key_states.shape[-2]
        return bind(self.keys, self), self.values

    # -- the attention function's contract (kvprune.caches.contract) -------------------------------
    def observe_padding(self, new_valid: torch.Tensor | None) -> None:
        """Validity comes from the lazy forward, not from the padding mask."""

    def attention_allowed(self, n_queries: int, sliding_window: int | None = None) -> torch.Tensor | None:
        """Selected, valid keys at or before each query's position: ``[B, 1, Q, N]`` (None: every slot)."""
        step = self.step
        if step.newest_only and sliding_window is None and step.all_selected and not self._holes:
            return None  # the newest token alone, every slot real and selected: nothing to mask
        chosen = self.valid & step.selected.gather(1, self.positions.clamp(min=0))
        if step.newest_only and sliding_window is None:
            return chosen[:, None, None, :]  # the one query is the newest token: every key is before it or it
        kpos = self.positions[:, None, None, :]
        qpos = step.query_positions[:, None, :, None]
        allowed = chosen[:, None, None, :] & (kpos <= qpos)
        if sliding_window is not None:
            allowed &= kpos > qpos - sliding_window
        return allowed | (kpos == qpos)  # padding queries (position -1) see only padding: finite rows

    def is_plain_causal(self, n_queries: int, sliding_window: int | None = None) -> bool:
        """True when this layer holds exactly the queries, all real, in position order (a prefill)."""
        qpos = self.step.query_positions
        return (
            self.keys.shape[-2] == n_queries
            and bool(self.step.query_valid.all())
            and bool(self.step.selected.gather(1, qpos.clamp(min=0)).all())
            and (sliding_window is None or sliding_window >= int(qpos.max()) + 1)
        )

    def ordered_queries(self) -> OrderedQueries:
        """Queries come in ascending position (left-padded with -1) against slots in computation order; complete
        when every slot is real and selected and the slots hold each position up to the newest once; at the last
        layer of a decoding step only the newest token's output is read."""
        step, n = self.step, self.positions.shape[1]
        complete = (step.all_selected and not step.padded and not self._holes
                    and bool((self.positions.amax(dim=-1) == n - 1).all()))
        read = None
        if step.read_only is not None:  # that position's query in each row (a decoding step computes it everywhere)
            read = (step.query_positions == step.read_only).to(torch.int8).argmax(dim=1, keepdim=True)
        return OrderedQueries(step.query_positions, self.positions, complete, read)

    def finish(self, obs: torch.Tensor | None) -> None:
        """Hand the newest token's head-averaged attention per position (``[B, T]``) to the step's pruning rule."""
        self.pending = 0
        if obs is not None:
            self.step.importance = self._importance(obs)
        if self._holes:
            self.compact()

    def take_slots(self, order: torch.Tensor) -> None:
        self.keys, self.values = self.gather_slots(self.keys, order), self.gather_slots(self.values, order)

    def _importance(self, obs: torch.Tensor) -> torch.Tensor:
        n_tokens = self.step.selected.shape[1]
        imp = torch.zeros((obs.shape[0], n_tokens + 1), dtype=torch.float32, device=obs.device)
        slot_pos = torch.where(self.valid, self.positions, n_tokens)  # padding slots go to a dump column
        imp.scatter_(1, slot_pos, obs[:, 0].float())
        return imp[:, :n_tokens]

    # -- transformers' layer contract ---------------------------------------------------------------
    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else int(self.positions.max().item() + 1) if self.positions.numel() else 0

    def select_rows(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "positions", "valid"):
                setattr(self, name, getattr(self, name).index_select(0, index.to(self.device)))


class LazyCache(StepwiseCache):
    """The cache ``model.generate`` carries for LazyLLM: KV per layer and the Aux Cache of hidden states."""

    ROW_STATE = ("hidden", "depth", "token_valid", "rope_pos", "computed")

    def __init__(self, policy: LazyLLM, num_layers: int) -> None:
        self.policy = policy
        self.schedule = policy.schedule(num_layers)  # steps that read the prompt
        self.decode_schedule = policy.schedule(num_layers, decoding=True)  # steps of one new token per row
        super().__init__(layers=[LazyLayer(i, policy) for i in range(num_layers)])
        self.reset_tokens()

    def reset_tokens(self) -> None:
        self.n_seen = 0
        self.hidden: torch.Tensor | None = None  # [B, T, D] hidden state at the input of layer depth
        self.depth: torch.Tensor | None = None  # [B, T] layers computed so far
        self.token_valid: torch.Tensor | None = None  # [B, T] real token (not padding)
        self.rope_pos: torch.Tensor | None = None  # [B, T] RoPE position ids
        self.computed: torch.Tensor | None = None  # [B, T, L] times each token was computed at each layer

    def reset(self) -> None:
        super().reset()
        self.reset_tokens()

    def append_tokens(self, embeds: torch.Tensor, valid: torch.Tensor, rope_pos: torch.Tensor) -> None:
        """New tokens enter at depth 0 with their embeddings as the input of layer 0."""
        b, q, _ = embeds.shape
        if self.hidden is not None and self.hidden.shape[0] != b:
            raise BatchMismatchError(f"the cache holds batch {self.hidden.shape[0]} but got {b}; use one cache per batch")
        if self.hidden is not None and (self.hidden.shape[-1] != embeds.shape[-1] or self.hidden.dtype != embeds.dtype):
            raise CacheUsageError(
                f"the cache holds {self.hidden.dtype} hidden states of size {self.hidden.shape[-1]} but got "
                f"{embeds.dtype} of size {embeds.shape[-1]}: this cache belongs to another model; use one cache per "
                "model and conversation"
            )
        new = dict(
            hidden=embeds,
            depth=torch.zeros((b, q), dtype=torch.long, device=embeds.device),
            token_valid=valid,
            rope_pos=rope_pos,
            computed=torch.zeros((b, q, len(self.layers)), dtype=torch.int32, device=embeds.device),
        )
        self.append_state(new)
        self.n_seen += q

    def method_stats(self) -> dict[str, Any]:
        """LazyLLM evicts nothing (the Aux Cache and slot metadata count as metadata in ``stats()``); its counters:
        token-layer computations done against the unpruned count (valid tokens x layers)."""
        if self.computed is None:
            return {"computed": 0, "baseline": 0, "max_per_token_layer": 0}
        n_valid = int(self.token_valid.sum())
        return {
            "computed": int(self.computed.sum()),
            "baseline": n_valid * len(self.layers),
            "max_per_token_layer": int(self.computed.max()),
            "per_layer": self.computed.sum(dim=(0, 1)).tolist(),
        }

    def compute_stats(self) -> dict[str, Any]:
        """``stats().method`` without the byte accounting: computations done against the unpruned count."""
        return self.method_stats()
