"""LazyLLM (arXiv 2407.14057): dynamic token pruning by the last token's attention, revivable.

At a pruning layer, a token's importance is the newest token's attention to it averaged over all
heads (Eq. 2); the tokens below the k-th percentile of those still present leave every later layer
of this step, as queries and as keys. Every step starts again from the full context, so a token
pruned earlier can come back (the cache keeps its hidden state to resume from).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import InvalidParameterError
from .base import keep_top, register_method


@register_method
@dataclass
class LazyLLM:
    """Where to prune and how much: ``prune_ratios[i]`` of the present tokens after layer ``prune_layers[i]``.

    ``prune_layers`` entries are layer indices (int) or fractions of the depth (float in (0, 1)).
    ``decode_ratios`` (default: ``prune_ratios``, the paper's setting) apply instead at decoding steps
    (one new token per row): pruning less there revives more of what the prompt step deferred, which
    keeps multi-token answers intact while the prompt step keeps its time-to-first-token saving.
    """

    prune_layers: tuple[int | float, ...] = (0.3, 0.6, 0.9)
    prune_ratios: tuple[float, ...] = (0.5, 0.5, 0.5)
    decode_ratios: tuple[float, ...] | None = None

    name: ClassVar[str] = "lazyllm"
    budget_kind: ClassVar[str] = "none"  # it prunes computation, not memory
    wants_tokenizer: ClassVar[bool] = False
    observation: ClassVar[str] = "last_query"
    shared_across_heads: ClassVar[bool] = True  # importance is averaged over every head of the layer

    def __post_init__(self) -> None:
        self.prune_layers = tuple(self.prune_layers)
        self.prune_ratios = tuple(self.prune_ratios)
        if self.decode_ratios is not None:
            self.decode_ratios = tuple(self.decode_ratios)
        for label, ratios in (("prune_ratios", self.prune_ratios), ("decode_ratios", self.decode_ratios)):
            if ratios is not None and len(self.prune_layers) != len(ratios):
                raise InvalidParameterError(
                    f"prune_layers and {label} need one entry each per pruning layer; got "
                    f"{len(self.prune_layers)} layers and {len(ratios)} ratios"
                )
        for r in self.prune_ratios + (self.decode_ratios or ()):
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0.0 <= r < 1.0:
                raise InvalidParameterError(f"each prune ratio is the fraction of present tokens pruned, in [0, 1); got {r!r}")
        for l in self.prune_layers:
            ok = (isinstance(l, int) and not isinstance(l, bool) and l >= 0) or (isinstance(l, float) and 0.0 < l < 1.0)
            if not ok:
                raise InvalidParameterError(f"a pruning layer is a layer index >= 0 or a depth fraction in (0, 1); got {l!r}")
        dup = sorted({l for l in self.prune_layers if self.prune_layers.count(l) > 1})
        if dup:
            raise InvalidParameterError(
                f"pruning layers {dup[0]!r} and {dup[0]!r} name one layer twice in {self.prune_layers}; give each pruning "
                "layer once, with the ratio you want there"
            )

    def schedule(self, n_layers: int, decoding: bool = False) -> dict[int, float]:
        """``{layer index: prune ratio}`` (of a decoding step with ``decoding``); fractions map to
        ``round(f * n_layers)``, the last layer excluded. A layer given twice by index (or by an index and a
        fraction) is refused; fractions that round onto one layer compose there: ``1 - (1 - r1)(1 - r2)``."""
        ratios = self.decode_ratios if decoding and self.decode_ratios is not None else self.prune_ratios
        out: dict[int, float] = {}
        source: dict[int, int | float] = {}
        for l, r in zip(self.prune_layers, ratios):
            idx = l if isinstance(l, int) else int(round(l * n_layers))
            if idx >= n_layers - 1:
                if isinstance(l, int):
                    raise InvalidParameterError(
                        f"pruning layer {l} leaves no later layer to skip; valid: 0..{n_layers - 2} for {n_layers} layers"
                    )
                idx = n_layers - 2
            idx = max(idx, 0)
            if idx in source:
                if isinstance(l, int) or isinstance(source[idx], int):
                    raise InvalidParameterError(
                        f"pruning layers {source[idx]!r} and {l!r} are both layer {idx} of {n_layers}; give each "
                        "pruning layer once, with the ratio you want there"
                    )
                # depth fractions that round onto one layer of a shallow model: both prunings happen there,
                # one after the other, which is one pruning of the composed ratio
                r = 1.0 - (1.0 - out.get(idx, 0.0)) * (1.0 - r)
            source[idx] = l
            if r > 0:
                out[idx] = r
        return out

    @staticmethod
    def select(importance: torch.Tensor, present: torch.Tensor, newest: torch.Tensor, ratio: float) -> torch.Tensor:
        """Keep mask ``[B, T]``: per row, the present tokens not in the lowest ``ratio`` fraction by importance.

        :func:`~kvprune.policies.base.keep_top` keeps the rest: scores on the ranking grid, on a tie the newer
        token is pruned first (tokens are in position order); the newest token is always kept.
        """
        n_present = present.sum(-1)  # [B]
        n_prune = torch.floor(n_present.double() * ratio).long()
        return keep_top(importance, present, newest, n_present - n_prune)
