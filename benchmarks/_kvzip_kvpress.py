"""kvpress side of ``benchmarks/real_kvzip.py``: KVzipPress answers, run in kvpress's own virtual environment.

Not meant to be run by hand: ``<kvpress python> _kvzip_kvpress.py MODEL_DIR EXAMPLES.json OUT.jsonl RATIOS THREADS``.
Per example (batch 1, greedy, query-agnostic): the context is prefilled under ``KVzipPress(compression_ratio=r)``
(its replay and compression run when the press's context manager exits), then the question is fed against the
compressed cache and the answer decoded; ``r = 0`` is the plain ``DynamicCache``. One JSON line per answer with
the generated ids and the prefill seconds (context forward + KVzip's replay). Imports only torch, transformers
and kvpress (kvpress 0.5.5 pins transformers < 5.3; kvprune is not installed there). Resumable: a (ratio, id)
already in OUT is skipped.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from kvpress import KVzipPress
from transformers import AutoModelForCausalLM, DynamicCache


def main() -> None:
    model_dir, examples_path, out_path, ratios, threads = sys.argv[1:6]
    torch.set_num_threads(int(threads))
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    examples = json.load(open(examples_path))
    done = set()
    if os.path.exists(out_path):
        done = {(r["ratio"], r["id"]) for r in map(json.loads, open(out_path)) if r}
    for ratio in [float(x) for x in ratios.split(",")]:
        for ex in examples:
            if (ratio, ex["id"]) in done:
                continue
            ctx, q = torch.tensor([ex["context_ids"]]), torch.tensor([ex["question_ids"]])
            n_ctx = ctx.shape[1]
            cache = DynamicCache()
            with torch.inference_mode():
                t0 = time.perf_counter()
                if ratio > 0:
                    press = KVzipPress(compression_ratio=ratio)
                    with press(model):
                        model.model(input_ids=ctx, past_key_values=cache, use_cache=True)
                else:
                    model.model(input_ids=ctx, past_key_values=cache, use_cache=True)
                t1 = time.perf_counter()
                pos = torch.arange(n_ctx, n_ctx + q.shape[1]).unsqueeze(0)
                logits = model(input_ids=q, past_key_values=cache, position_ids=pos, use_cache=True,
                               logits_to_keep=1).logits
                step, gen = n_ctx + q.shape[1], []
                nxt = int(logits[0, -1].argmax())
                gen.append(nxt)
                while nxt not in ex["stop_ids"] and len(gen) < ex["max_new_tokens"]:
                    logits = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache,
                                   position_ids=torch.tensor([[step]]), use_cache=True).logits
                    step += 1
                    nxt = int(logits[0, -1].argmax())
                    gen.append(nxt)
            with open(out_path, "a") as f:
                f.write(json.dumps(dict(ratio=ratio, id=ex["id"], ids=gen, context_s=round(t1 - t0, 3),
                                        n_ctx=n_ctx, threads=torch.get_num_threads())) + "\n")
            print(f"kvpress KVzip r={ratio} {ex['id']}: {t1 - t0:.1f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
