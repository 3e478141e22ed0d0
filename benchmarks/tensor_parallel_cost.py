"""What tensor parallelism costs kvprune: its own all-reduces per decode step against the step's time.

Run under torchrun (gloo on CPU, or NCCL on GPUs)::

    torchrun --standalone --nproc-per-node 2 benchmarks/tensor_parallel_cost.py [--layers 8] [--prompt 512] [--new 64]

A random Llama (hidden 256, 8 query / 4 KV heads) is saved to a temporary folder and loaded with
``tp_plan="auto"``; each method generates ``--new`` greedy tokens after a ``--prompt``-token prompt, three
times. Rank 0 prints, per method, the median decode time per step, kvprune's collectives per step (the
model's own two all-reduces per layer come on top), their payload, and the time spent inside them (which
includes waiting for the slower rank). Per-head policies (full, h2o) issue none.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist

METHODS = {"full": (None, {}), "h2o": (256, {}), "tova": (256, {}), "lazyllm": (None, {}),
           "spatten": (None, {"token_ratio": 0.5, "head_ratio": 0.25})}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import kvprune
    from kvprune.distributed import TensorParallel

    spent = {"calls": 0, "seconds": 0.0, "bytes": 0}
    plain = TensorParallel.all_reduce_sum

    def timed(self, t):
        start = time.perf_counter()
        out = plain(self, t)
        if self.active:
            spent["calls"] += 1
            spent["bytes"] += t.numel() * t.element_size()
            spent["seconds"] += time.perf_counter() - start
        return out

    TensorParallel.all_reduce_sum = timed
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    with tempfile.TemporaryDirectory() as tmp:
        path = [tmp]
        # every rank must load the same folder: rank 0 writes it, the others wait (the group exists once loaded)
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.broadcast_object_list(path, src=0)
        if dist.get_rank() == 0:
            torch.manual_seed(0)
            LlamaForCausalLM(config).save_pretrained(path[0])
        dist.barrier()
        model = AutoModelForCausalLM.from_pretrained(path[0], tp_plan="auto", dtype=torch.float32).eval()
        dist.barrier()
    ids = torch.randint(3, 512, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    rows = []
    for method, (budget, params) in METHODS.items():
        per_step, calls, secs, nbytes = [], 0, 0.0, 0
        for _ in range(3):
            cache = kvprune.make_cache(model, method, budget, **params)
            out = model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, past_key_values=cache,
                                 pad_token_id=0)  # the prefill
            spent.update(calls=0, seconds=0.0, bytes=0)
            start = time.perf_counter()
            model.generate(input_ids=out, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                           past_key_values=cache, pad_token_id=0)
            per_step.append((time.perf_counter() - start) / args.new)
            calls, secs, nbytes = spent["calls"], spent["seconds"], spent["bytes"]
        rows.append((method, statistics.median(per_step) * 1e3, calls / args.new, nbytes / max(calls, 1),
                     secs / args.new * 1e3))
    if dist.get_rank() == 0:
        print(f"world {dist.get_world_size()}, {args.layers} layers, prompt {args.prompt}, {args.new} new tokens")
        print(f"{'method':8s} {'ms/step':>8s} {'kvprune all-reduces/step':>25s} {'bytes each':>11s} {'ms in them/step':>16s}")
        for method, ms, n, b, t in rows:
            print(f"{method:8s} {ms:8.2f} {n:25.1f} {b:11.0f} {t:16.2f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
