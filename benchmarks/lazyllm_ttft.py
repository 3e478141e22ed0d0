"""LazyLLM time-to-first-token and total generation time against the unpruned model, on this CPU.

    python benchmarks/lazyllm_ttft.py [--lengths 2048,4096] [--new-tokens 32] [--repeats 3]
                                      [--prune-layers 0.3,0.6,0.9] [--ratios 0.5,0.5,0.5] [--decode-ratios R] [--demo]

A random-initialised Llama on random tokens, or with ``--demo`` the embedded demo model on documents
of its QA suite (how many tokens each decoding step revives depends on the attention the weights
make, so long generations are timed on the trained model too); ratios are measured in one run,
medians over repeats. Accuracy lives in benchmarks/lazyllm_accuracy.py (demo model).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvprune
from kvprune.integrations.compat import with_cache


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--ratios", default="0.5,0.5,0.5", help="LazyLLM prune ratios, one per pruning layer")
    ap.add_argument("--decode-ratios", default="same", help="prune ratios at decoding steps; 'same': --ratios")
    ap.add_argument("--prune-layers", default="0.3,0.6,0.9", help="layer indices, or depth fractions with a '.'")
    ap.add_argument("--demo", action="store_true", help="the embedded demo model on QA-suite documents")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.demo:
        from kvprune.demo import load_demo_model
        from kvprune.eval.tasks import build_suite, format_prompt

        model, tok = load_demo_model()
        args.layers, args.hidden = model.config.num_hidden_layers, model.config.hidden_size

        def prompt_ids(n: int) -> torch.Tensor:
            ex = build_suite(seed=0, n_per_task=1, lengths=[n], tokenizer=tok)[0]
            return tok(format_prompt(ex), return_tensors="pt").input_ids
    else:
        config = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                             num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=2,
                             max_position_embeddings=8192, attn_implementation="sdpa")
        model = LlamaForCausalLM(config).eval()

        def prompt_ids(n: int) -> torch.Tensor:
            return torch.randint(3, 1024, (1, n))
    ratios = tuple(float(r) for r in args.ratios.split(","))
    layers = tuple(float(x) if "." in x else int(x) for x in args.prune_layers.split(","))
    decode = None if args.decode_ratios == "same" else tuple(float(r) for r in args.decode_ratios.split(","))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: {'demo, ' if args.demo else ''}Llama {args.layers} layers, hidden {args.hidden}, GQA 2 KV heads; LazyLLM prune ratios {ratios} after layers {layers}, "
          f"decoding steps {decode or ratios}")
    print("| prompt | TTFT full (s) | TTFT LazyLLM (s) | TTFT speedup | total full (s) | total LazyLLM (s) | total speedup | layer-token work |")
    print("|---|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = prompt_ids(n)

        def gen(make, new):
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, **with_cache(make()), pad_token_id=0)

        full = lambda: (model.set_attn_implementation("sdpa"), DynamicCache())[1]  # noqa: E731  plain transformers
        lazy = lambda: kvprune.make_cache(model, "lazyllm", prune_layers=layers, prune_ratios=ratios,  # noqa: E731
                                            decode_ratios=decode)
        # interleaved repeats, so load from other processes hits both sides alike
        ttft_full, ttft_lazy, tot_full, tot_lazy = [], [], [], []
        for _ in range(args.repeats):
            ttft_full.append(timed(lambda: gen(full, 1), 1))
            ttft_lazy.append(timed(lambda: gen(lazy, 1), 1))
        for _ in range(max(1, args.repeats // 2)):
            tot_full.append(timed(lambda: gen(full, args.new_tokens), 1))
            tot_lazy.append(timed(lambda: gen(lazy, args.new_tokens), 1))
        ttft_full, ttft_lazy = statistics.median(ttft_full), statistics.median(ttft_lazy)
        tot_full, tot_lazy = statistics.median(tot_full), statistics.median(tot_lazy)
        cache = lazy()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, **with_cache(cache), pad_token_id=0)
        st = cache.compute_stats()
        print(f"| {n} | {ttft_full:.3f} | {ttft_lazy:.3f} | {ttft_full / ttft_lazy:.2f}x | {tot_full:.3f} | "
              f"{tot_lazy:.3f} | {tot_full / tot_lazy:.2f}x | {st['computed'] / st['baseline']:.2f} |")


if __name__ == "__main__":
    main()
