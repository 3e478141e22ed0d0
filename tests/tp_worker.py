"""Run every kvprune method on a saved tiny Llama and record what each decided, for the tensor-parallel test.

``python tests/tp_worker.py MODEL_DIR OUT_DIR`` runs in one process (the reference);
``torchrun --nproc-per-node 2 tests/tp_worker.py MODEL_DIR OUT_DIR --tp`` loads the model with
``tp_plan="auto"`` (gloo on CPU) and every rank writes its own record. A record holds, per method and
batch: the greedy tokens, the keep-sets keyed by *global* KV head (a rank stores only its own heads),
and the invariants checked on that rank (LazyLLM: each token computed at most once per layer; SpAtten:
a pruned token or head never comes back, and each layer holds exactly the tokens of its cascade depth).
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch

from kvprune.policies import methods

N_NEW = 12
#: every method (label -> method, budget, parameters) with parameters that make it decide something on prompts
#: of 9..20 tokens; a label differs from its method where one method runs in two configurations
METHODS: dict[str, tuple[str, object, dict]] = {
    "full": ("full", None, {}),
    "streaming": ("streaming", 10, {"n_sink": 2}),
    "h2o": ("h2o", 10, {}),
    "a2sf": ("a2sf", 10, {}),
    "tova": ("tova", 10, {}),
    "snapkv": ("snapkv", 10, {"window": 4}),
    "knorm": ("knorm", 10, {}),
    "keydiff": ("keydiff", 10, {}),
    "observed": ("observed", 10, {}),
    "random": ("random", 10, {"seed": 3}),
    "tova-kv8": ("tova", 10, {"kv_bits": 8}),  # quantized storage: the same decisions on packed records
    "random-kv4": ("random", 10, {"seed": 3, "kv_bits": 4}),
    "lazyllm": ("lazyllm", None, {}),
    "spatten": ("spatten", None, {"token_ratio": 0.5, "token_start": 0.25, "head_ratio": 0.5, "head_start": 0.25}),
}
if "kvzip" in methods():  # registered once its module is part of the package
    METHODS["kvzip"] = ("kvzip", 10, {"chunk_size": 8, "n_sink": 2})
    METHODS["kvzip-global"] = ("kvzip", 10, {"chunk_size": 8, "n_sink": 2, "scope": "global", "prefill_only": True})


def batches() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Batch 1, and a left-padded batch of 3 (prompts of 20, 14 and 9 tokens)."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, lengths in (("b1", [17]), ("b3", [20, 14, 9])):
        total = max(lengths)
        ids = torch.zeros((len(lengths), total), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            ids[i, total - n :] = torch.randint(3, 128, (n,), generator=g)
            mask[i, total - n :] = 1
        out[name] = (ids, mask)
    return out


def _positions(pos: torch.Tensor, valid: torch.Tensor) -> list[int]:
    return sorted(int(p) for p in pos[valid].tolist())


def keep_sets(cache) -> dict[str, list[int]]:
    """``"layer/row/global KV head" -> sorted positions held`` (LazyLLM: the tokens a layer holds, every head)."""
    from kvprune.caches.lazy import LazyCache
    from kvprune.caches.spatten import SpAttenCache
    from kvprune.distributed import parallel_of

    sets: dict[str, list[int]] = {}
    for li, layer in enumerate(cache.layers):
        if not layer.is_initialized:
            continue
        if isinstance(cache, LazyCache):
            for b in range(layer.positions.shape[0]):
                sets[f"{li}/{b}"] = _positions(layer.positions[b], layer.valid[b])
        elif isinstance(cache, SpAttenCache):
            for b in range(layer.positions.shape[0]):
                held = _positions(layer.positions[b], layer.valid[b])
                for g in layer.kv_heads.tolist():
                    sets[f"{li}/{b}/{g}"] = held
        else:
            offset = parallel_of(cache).head_offset(layer.positions.shape[1])  # this rank's first KV head
            for b in range(layer.positions.shape[0]):
                for h in range(layer.positions.shape[1]):
                    sets[f"{li}/{b}/{offset + h}"] = _positions(layer.positions[b, h], layer.valid[b, h])
    return sets


def invariants(cache, snapshots: list[torch.Tensor]) -> list[str]:
    """What this rank sees broken (an empty list when the method's invariants hold here)."""
    from kvprune.caches.lazy import LazyCache
    from kvprune.caches.spatten import SpAttenCache

    broken = []
    if isinstance(cache, LazyCache):
        if int(cache.computed.max()) > 1:
            broken.append(f"lazyllm: a token computed {int(cache.computed.max())} times at one layer")
        if int(cache.computed.sum()) >= int(cache.token_valid.sum()) * len(cache.layers):
            broken.append("lazyllm: nothing was pruned (the test would not show a difference)")
    if isinstance(cache, SpAttenCache):
        for before, after in zip(snapshots, snapshots[1:]):
            n = before.shape[1]
            if bool((after[:, :n] > before).any()):
                broken.append("spatten: a pruned token came back at a later step")
        for li, layer in enumerate(cache.layers):
            present = cache.token_valid & (cache.depth > li)
            for b in range(present.shape[0]):
                want = torch.nonzero(present[b]).flatten().tolist()
                if _positions(layer.positions[b], layer.valid[b]) != want:
                    broken.append(f"spatten: layer {li} row {b} holds tokens other than its cascade's")
        if bool((cache.depth[cache.token_valid] == len(cache.layers)).all()):
            broken.append("spatten: no token was pruned (the test would not show a difference)")
        if bool((cache.head_depth == len(cache.layers)).all()):
            broken.append("spatten: no head was pruned (the test would not show a difference)")
    return broken


def run(model) -> dict:
    """Every method on every batch: tokens, keep-sets, broken invariants, SpAtten/LazyLLM state, stats, timings."""
    import kvprune
    from kvprune.distributed import TensorParallel
    from transformers import LogitsProcessor, LogitsProcessorList

    class Snapshot(LogitsProcessor):
        """SpAtten's token depths after every step (a pruned token must never come back)."""

        def __init__(self, cache) -> None:
            self.cache, self.seen = cache, []

        def __call__(self, input_ids, scores):
            depth = getattr(self.cache, "depth", None)
            if depth is not None:
                self.seen.append(depth.clone())
            return scores

    # what kvprune's own collectives cost: calls and seconds inside them, per generate
    spent = {"calls": 0, "seconds": 0.0}
    plain = TensorParallel.all_reduce_sum

    def timed(self, t):
        start = time.perf_counter()
        out = plain(self, t)
        if self.active:
            spent["calls"] += 1
            spent["seconds"] += time.perf_counter() - start
        return out

    TensorParallel.all_reduce_sum = timed
    record: dict = {}
    try:
        for name, (ids, mask) in batches().items():
            for label, (method, budget, params) in METHODS.items():
                cache = kvprune.make_cache(model, method, budget, **params)
                snap = Snapshot(cache)
                spent.update(calls=0, seconds=0.0)
                start = time.perf_counter()
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False,
                                     pad_token_id=0, past_key_values=cache,
                                     logits_processor=LogitsProcessorList([snap]))
                entry = {"tokens": out[:, ids.shape[1] :].tolist(), "keep": keep_sets(cache),
                         "broken": invariants(cache, snap.seen), "seconds": time.perf_counter() - start,
                         "reduce_calls": spent["calls"], "reduce_seconds": spent["seconds"]}
                if method == "spatten":
                    entry["depth"] = cache.depth.tolist()
                    entry["head_depth"] = cache.head_depth.tolist()
                if method == "lazyllm":
                    entry["computed"] = cache.computed.tolist()
                if method in ("tova", "spatten"):  # what the rank holds, and the total over ranks (a collective)
                    local, total = cache.stats(), cache.stats(total=True)
                    entry["stats"] = {"kept": [k.tolist() for k in local.kept], "kv_bytes": local.kv_bytes,
                                      "total_kept": [k.tolist() for k in total.kept], "total_kv_bytes": total.kv_bytes,
                                      "total_evictions": total.evictions}
                record[f"{label}/{name}"] = entry
    finally:
        TensorParallel.all_reduce_sum = plain
    return record


def unaware(model) -> str:
    """A cache built without ``make_cache`` does not know the model's group: the error it raises (every rank)."""
    import kvprune

    kvprune.prepare_model(model)
    cache = kvprune.PruningCache("tova", 10, config=model.config)
    ids, mask = batches()["b1"]
    try:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                       past_key_values=cache)
    except kvprune.KVPruneError as e:
        return type(e).__name__
    return "none"


def main() -> None:
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    tp = "--tp" in sys.argv
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    if tp:
        model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32)
        rank = torch.distributed.get_rank()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        rank = 0
    record = run(model.eval())
    record["_unaware"] = unaware(model)
    record["_seconds"] = time.perf_counter() - start
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    if tp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
