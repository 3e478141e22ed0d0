"""LazyLLM accuracy and time-to-first-token on the long-document QA suite (embedded demo model).

    python benchmarks/lazyllm_accuracy.py [--lengths 1024,2048] [--n 8] [--layers 0.3,0.6,0.9] [--ratios 0.5,0.5,0.5]
                                          [--decode-ratios R] [--protocol single|split] [--model PATH] [--threads 1]

Exact match of the full model and of LazyLLM on the same generated examples (batch 1), with the mean
time to the first answer token of each, measured in one run with the two interleaved per example.
``--protocol single`` reads context and question in one forward (LazyLLM's own setting: the paper
times the whole prompt); ``split`` prefills the context first, then the question (the protocol the
KV-eviction comparison uses). Several ``--ratios`` groups can be given, separated by ``/``, and as many
``--decode-ratios`` groups (``same``: the prompt's ratios), or one for all. Total time is prefill plus decode.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from kvprune.demo import load_demo_model
from kvprune.eval.qa import run_qa
from kvprune.eval.tasks import build_suite
from kvprune.policies.lazyllm import LazyLLM


def _layers(text: str) -> tuple[int | float, ...]:
    return tuple(float(x) if "." in x else int(x) for x in text.split(","))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--n", type=int, default=8, help="examples per task kind and length")
    ap.add_argument("--layers", default="0.3,0.6,0.9", help="pruning layers: indices, or depth fractions with a '.'")
    ap.add_argument("--ratios", default="0.5,0.5,0.5", help="prune ratios, one per layer; '/' separates configurations")
    ap.add_argument("--decode-ratios", default="same", help="ratios at decoding steps, groups as --ratios; 'same': the prompt's")
    ap.add_argument("--protocol", choices=("single", "split"), default="single")
    ap.add_argument("--model", default=None, help="a model folder (default: the embedded demo model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa").eval()
        tok = AutoTokenizer.from_pretrained(args.model)
    else:
        model, tok = load_demo_model()
    layers = _layers(args.layers)
    configs = [tuple(float(r) for r in group.split(",")) for group in args.ratios.split("/")]
    decode_groups = args.decode_ratios.split("/")
    if len(decode_groups) not in (1, len(configs)):
        ap.error(f"--decode-ratios needs one group or one per --ratios group ({len(configs)})")
    decodes = [None if g == "same" else tuple(float(r) for r in g.split(",")) for g in decode_groups] * (len(configs) // len(decode_groups))
    protocol = "query_agnostic" if args.protocol == "split" else "query_aware"
    print(f"{model.config.num_hidden_layers}-layer model, {torch.get_num_threads()} thread(s), protocol {args.protocol}; "
          f"LazyLLM pruning layers {layers} -> {LazyLLM(layers, configs[0]).schedule(model.config.num_hidden_layers)}")
    print("| length | examples | ratios | decode ratios | EM full | EM LazyLLM | EM LazyLLM per task (full) | TTFT full (s) | "
          "TTFT LazyLLM (s) | TTFT speedup | total speedup | layer-token work |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for length in [int(x) for x in args.lengths.split(",")]:
        examples = build_suite(seed=args.seed, n_per_task=args.n, lengths=[length], tokenizer=tok)
        for ratios, decode in zip(configs, decodes):
            policy = LazyLLM(layers, ratios, decode)
            full, lazy = [], []
            for ex in examples:  # interleaved, so machine noise hits both alike
                full += run_qa(model, tok, [ex], "full", protocol=protocol)
                lazy += run_qa(model, tok, [ex], policy, protocol=protocol)
            em = lambda xs: sum(a.correct for a in xs) / len(xs)  # noqa: E731
            t = lambda xs: statistics.mean(a.prefill_s for a in xs)  # noqa: E731
            total = lambda xs: statistics.mean(a.prefill_s + a.decode_s for a in xs)  # noqa: E731
            tasks = sorted({a.task for a in full})
            per_task = ", ".join(
                f"{task} {em([a for a in lazy if a.task == task]):.2f} ({em([a for a in full if a.task == task]):.2f})"
                for task in tasks
            )
            dec = "same" if decode is None else ", ".join(map(str, decode))
            print(f"| {length} | {len(examples)} | {', '.join(map(str, ratios))} | {dec} | {em(full):.3f} | {em(lazy):.3f} | "
                  f"{per_task} | {t(full):.3f} | {t(lazy):.3f} | {t(full) / t(lazy):.2f}x | {total(full) / total(lazy):.2f}x | "
                  f"{_work(model, tok, examples[0], policy, args.protocol == 'split')} |", flush=True)


def _work(model, tok, example, policy, sep) -> str:
    """Token-layer computations done over the unpruned count, for one example (prefill and decode)."""
    from kvprune import make_cache
    from kvprune.eval.qa import greedy_decode

    cache = make_cache(model, policy)
    ids = tok(example["context"] + " " + example["question"], return_tensors="pt")
    n_ctx = len(tok(example["context"]).input_ids)
    greedy_decode(model, ids.input_ids, ids.attention_mask, cache, 8, {tok.eos_token_id}, context_len=n_ctx if sep else None)
    s = cache.compute_stats()
    return f"{s['computed'] / max(1, s['baseline']):.2f}"


if __name__ == "__main__":
    main()
