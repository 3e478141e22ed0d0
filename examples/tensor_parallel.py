"""Generate with a kvprune cache on a tensor-parallel model: each rank holds half of the heads and their KV.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py [--policy tova] [--budget 128]

Uses the demo model shipped with kvprune (4 query / 2 KV heads, so 2 ranks hold one KV head each), gloo on
CPU. Rank 0 prints the answer and what the cache holds on this rank and over all ranks; running the same
script with ``--nproc-per-node 1`` prints the same answer.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

import kvprune
from kvprune.demo import DEMO_MODEL_PATH
from kvprune.eval.tasks import build_suite, format_prompt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", default="tova")
    parser.add_argument("--budget", type=float, default=128)
    parser.add_argument("--new", type=int, default=8)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)

    # tp_plan="auto" shards every attention and MLP projection over the ranks torchrun started
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_PATH, tp_plan="auto", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_PATH)
    example = build_suite(seed=1, n_per_task=1, lengths=(512,))[0]  # a 512-token needle question
    inputs = tokenizer(format_prompt(example), return_tensors="pt")

    budget = int(args.budget) if args.budget >= 1 else args.budget
    cache = kvprune.make_cache(model, args.policy, budget if args.policy not in ("full", "lazyllm", "spatten") else None)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=args.new, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    here, total = cache.stats(), cache.stats(total=True)  # total: a collective, every rank calls it
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        print(f"{args.policy}: {answer!r} (expected {example['answer']!r})")
        print(f"this rank holds {here.kept[0].shape[-1]} KV head(s), {here.kv_bytes} bytes of K/V; "
              f"all ranks: {total.kept[0].shape[-1]} KV heads, {total.kv_bytes} bytes")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
