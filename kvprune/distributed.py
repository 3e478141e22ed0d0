"""Tensor parallelism: the process group of a sharded model, and the few collectives kvprune's decisions need.

A model loaded with ``from_pretrained(..., tp_plan="auto")`` under ``torchrun`` holds, on each rank, a
contiguous slice of the query heads and of the KV heads (rank ``r`` of ``n``: KV heads
``r * Hkv/n .. (r+1) * Hkv/n - 1``), so each rank's cache stores only those heads. A decision taken per
KV head is already the single-process decision there; a decision that combines heads (TOVA's one
keep-set per layer, LazyLLM's head-averaged importance, SpAtten's token and head cascade) must see every
head, so its scores are summed across the group with one all-reduce and divided by the global head count:
every rank then holds the same numbers and takes the same decision, which keeps the ranks' tensors the
same shape for the model's own all-reduces. Anything keyed by a head's index uses the global index.

Without a group (one process) every helper here is a no-op and :data:`SINGLE` stands for it. This module
imports nothing of kvprune's, so policies, caches and integrations may all use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CacheUsageError, UnsupportedArchitectureError


@dataclass(frozen=True)
class TensorParallel:
    """The tensor-parallel group a cache's model is sharded over (``size == 1``: one process, no group)."""

    group: Any = None  # torch.distributed.ProcessGroup, or None for one process
    rank: int = 0  # this process's rank within ``group``
    size: int = 1  # ranks in ``group``

    @property
    def active(self) -> bool:
        """True when the model is sharded over more than one rank (the collectives run)."""
        return self.size > 1

    def local_range(self, n_global: int) -> tuple[int, int]:
        """``(start, stop)``: the global indices of the heads this rank holds out of ``n_global``."""
        per = n_global // self.size
        return self.rank * per, (self.rank + 1) * per

    def head_offset(self, n_local: int) -> int:
        """Global index of this rank's first head, given the heads it holds (``n_local`` per rank)."""
        return self.rank * n_local

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the group, in place, and return it (every rank gets the same bits); a no-op alone."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def head_mean(self, scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Mean over every head of the model along ``dim`` (kept, size 1), though this rank holds only its own:
        the local sum is all-reduced, then divided by the global head count. Alone: ``scores.mean(dim)``."""
        if not self.active:
            return scores.mean(dim=dim, keepdim=True)
        total = self.all_reduce_sum(scores.sum(dim=dim, keepdim=True, dtype=torch.float32))
        return (total / (scores.shape[dim] * self.size)).to(scores.dtype)

    def gather_heads(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``t`` concatenated along ``dim`` in rank order (this rank's heads -> all heads); alone: ``t``."""
        if not self.active:
            return t
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


#: one process: no group, every collective a no-op
SINGLE = TensorParallel()


def _tp_mesh(model: torch.nn.Module) -> Any:
    """The ``tp`` device mesh transformers sharded ``model`` over, or None."""
    manager = getattr(model, "_mesh_manager", None)
    if manager is not None and hasattr(manager, "get_mesh"):
        try:
            return manager.get_mesh("tp")
        except (KeyError, RuntimeError, ValueError):
            pass
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        return None
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tp" in names:
        return mesh["tp"]
    return mesh if mesh.ndim == 1 else None


def tensor_parallel_of(model: torch.nn.Module) -> TensorParallel:
    """The tensor-parallel group of ``model`` (loaded with ``tp_plan``), or :data:`SINGLE` for an unsharded model.

    Raises :class:`UnsupportedArchitectureError` when the group size does not divide the query and KV head
    counts (transformers then replicates heads across ranks, and a rank's heads are no longer its own slice).
    """
    size = getattr(model, "_tp_size", None) or getattr(model, "tp_size", None) or 1
    mesh = _tp_mesh(model) if size > 1 else None
    if mesh is None or mesh.size() <= 1:
        return SINGLE
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    if n_heads % mesh.size() or n_kv % mesh.size():
        raise UnsupportedArchitectureError(
            f"kvprune needs the tensor-parallel size to divide the head counts so that each rank holds its own "
            f"heads; this model has {n_heads} query and {n_kv} KV heads over {mesh.size()} ranks: use a "
            f"tensor-parallel size that divides {n_kv}"
        )
    return TensorParallel(group=mesh.get_group(), rank=mesh.get_local_rank(), size=mesh.size())


def attach(cache: Any, parallel: TensorParallel) -> Any:
    """Tell ``cache`` and each of its layers which group they run in (``parallel``); returns ``cache``."""
    cache.parallel = parallel
    for layer in cache.layers:
        layer.parallel = parallel
    return cache


def parallel_of(obj: Any) -> TensorParallel:
    """The group a cache or cache layer was attached to (:data:`SINGLE` when none was)."""
    return getattr(obj, "parallel", None) or SINGLE


def check_shard(parallel: TensorParallel, local_heads: int, global_heads: int | None) -> None:
    """Refuse a cache that does not know its model is sharded (its layers see ``local_heads`` of ``global_heads``
    query heads): its head-combining decisions would differ between ranks and break the group."""
    if global_heads and local_heads * parallel.size != global_heads:
        raise CacheUsageError(
            f"this rank's attention has {local_heads} of the model's {global_heads} query heads (a tensor-parallel "
            f"model) but the cache was built for {parallel.size} rank(s); build it with kvprune.make_cache(model, ...), "
            "which finds the model's process group"
        )


def total_stats(stats: Any, parallel: TensorParallel, replicated_evictions: bool = False) -> Any:
    """A cache's ``CacheStats`` summed over the group (a collective: every rank must call it): ``kept`` holds
    every rank's KV heads in global order, evictions and bytes are summed, ``slots`` is the widest rank's.

    ``replicated_evictions``: the cache counts evictions per token, not per KV head (SpAtten's cascade), so
    every rank counts the same and the total is one rank's count.
    """
    if not parallel.active:
        return stats
    kept = [parallel.gather_heads(k, dim=-1) for k in stats.kept]
    counts = torch.tensor([*stats.evictions, stats.kv_bytes, stats.metadata_bytes, *[-s for s in stats.slots]],
                          dtype=torch.int64)
    n = len(stats.evictions)
    summed = parallel.all_reduce_sum(counts.clone())
    import torch.distributed as dist

    widest = counts[n + 2 :].clone()
    if widest.numel():
        dist.all_reduce(widest, op=dist.ReduceOp.MIN, group=parallel.group)  # min of -slots: the widest
    return dataclasses.replace(
        stats,
        kept=kept,
        evictions=list(stats.evictions) if replicated_evictions else summed[:n].tolist(),
        kv_bytes=int(summed[n]),
        metadata_bytes=int(summed[n + 1]),
        slots=(-widest).tolist(),
    )
