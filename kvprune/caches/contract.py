"""The contract between a kvprune cache layer and kvprune's attention function.

A decoder layer's attention module calls ``cache.update(keys, values, layer_idx)``; the cache layer stores
the new tokens and returns what the attention reads, with itself bound to the returned keys (:func:`bind`).
kvprune's attention function finds the layer with :func:`layer_of` -- the one way from the call to the
layer -- and drives it through :class:`AttentionLayer`: before attention (padding of the new tokens, the
mask), during (the observation the layer's policy declared) and after (:meth:`AttentionLayer.finish`:
fold the observation in, evict). A layer that computes attention itself (SpAtten's pruned heads and
quantized parts) offers :attr:`AttentionLayer.own_attention` and the function delegates to it.

Step-by-step forwards (LazyLLM, SpAtten) tell each layer what the step is about before it runs with one
:class:`StepContext`; what the layer hands back for the forward's next decision goes in the same object.
"""

from __future__ import annotations

import weakref

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

#: the attribute of the returned keys that names their layer (set by :func:`bind` only)
_ATTR = "_kvprune_layer"

#: ``(layer, query, key, value, backend, scaling, sliding_window) -> (output [B, q, Hq, Dv], observation or None)``
OwnAttention = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]


class OrderedQueries(NamedTuple):
    """Queries in ascending position against slots in any order (what :meth:`AttentionLayer.ordered_queries` says)."""

    query_positions: torch.Tensor  # [B, q] ascending
    slot_positions: torch.Tensor  # [B, S]
    #: the slots hold every position 0..S-1 once, all real and visible: the mask is plain causal by position
    complete: bool = False
    #: ``[B, r]`` the only queries whose output is read (the rest are computed for their keys and values alone,
    #: e.g. tokens LazyLLM revives at the last layer); None: every query's
    read: torch.Tensor | None = None


@runtime_checkable
class AttentionLayer(Protocol):
    """What kvprune's attention function asks of a cache layer, in call order."""

    #: tokens stored by the last ``update`` and not yet finished; the attention drives the layer only when
    #: this equals the number of queries (otherwise the call is not about this layer's new tokens)
    pending: int
    #: the policy whose declared observation the attention estimates (``observation``, ``query_weights``,
    #: ``shared_across_heads``, ``window_size``)
    policy: Any
    #: True: observe nothing at this call (``prefill_only`` past the prompt; a LazyLLM layer that does not prune)
    frozen: bool
    #: attention the layer computes itself, or None for the shared path (see :data:`OwnAttention`)
    own_attention: OwnAttention | None
    #: the tensor-parallel group (kvprune.distributed.TensorParallel): a head-shared observation is averaged
    #: over every rank's heads
    parallel: Any

    def observe_padding(self, new_valid: torch.Tensor | None) -> None:
        """Which new tokens are real, ``[B, q]`` bool (None: all)."""

    def attention_allowed(self, n_queries: int, sliding_window: int | None = None) -> torch.Tensor | None:
        """Which slots each query may attend, ``[B, H or 1, q, S]`` bool; None when every slot is visible."""

    def is_plain_causal(self, n_queries: int, sliding_window: int | None = None) -> bool:
        """Whether the mask is plain causal over the slots (a fresh prefill): the kernel's causal path applies."""

    def ordered_queries(self) -> OrderedQueries | None:
        """The queries' and slots' positions when the queries come in position order against slots in any
        order (LazyLLM), so attention can skip the mask's empty part; else None."""

    def fold_row(self, rows: torch.Tensor) -> bool:
        """A decode step's softmax rows ``[B * Hkv, G, S]`` (one query, every slot), offered before ``finish``: True
        when the layer folded them into its state itself (``finish`` then gets no observation)."""

    def finish(self, obs: torch.Tensor | None) -> None:
        """After attention: fold the observation ``[B, Hkv, S]`` (or None) in, evict, clear ``pending``."""


def bind(keys: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
    """Name ``layer`` as the owner of ``keys`` (what ``update`` returns) for the attention function. A weak
    reference: the layer keeps its keys (views of its buffers), so a strong one would be a reference cycle, and a
    dropped cache's memory would wait for the garbage collector."""
    ref = getattr(keys, _ATTR, None)
    if ref is None or ref() is not layer:  # a layer hands the same kept view back at every step
        setattr(keys, _ATTR, weakref.ref(layer))
    return keys


def layer_of(keys: torch.Tensor) -> AttentionLayer | None:
    """The kvprune layer that returned ``keys`` from its ``update``, or None (no kvprune cache in this call)."""
    ref = getattr(keys, _ATTR, None)
    return None if ref is None else ref()


@dataclass
class StepContext:
    """What a step-by-step forward tells a layer before running it, and what the layer hands back.

    Queries are packed per row in ascending position, left-padded with position -1.
    """

    query_positions: torch.Tensor  # [B, Q] logical positions of this layer's queries (-1: padding)
    query_valid: torch.Tensor  # [B, Q] real queries
    selected: torch.Tensor | None = None  # [B, T] tokens selected at this step (LazyLLM): keys outside are masked
    observe: bool = False  # the forward prunes after this layer: the attention observes (LazyLLM)
    newest_only: bool = False  # each row's only query is the step's newest token (every key precedes it)
    padded: bool = True  # some query is padding
    all_selected: bool = False  # every real token is selected (no key is masked out by the selection)
    #: only the query at this position is read after this layer (the last layer of a decoding step: revived
    #: tokens need their keys and values there, not their output); None: every query's output is read
    read_only: int | None = None
    importance: torch.Tensor | None = None  # out: [B, T] the newest token's head-averaged attention (LazyLLM)
