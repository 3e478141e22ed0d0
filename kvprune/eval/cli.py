"""The ``kvprune`` command: ``compare`` policies, run ``longqa`` with one policy, ``generate`` from a prompt."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..policies import METHODS
from .compare import DEFAULT_POLICIES


def _budget(text: str) -> int | float | None:
    if text.lower() in ("none", "full"):
        return None
    return float(text) if any(c in text for c in ".eE") else int(text)


def _csv(kind):
    return lambda text: [kind(t) for t in text.split(",") if t.strip()]


def _params(text: str | None) -> dict[str, Any]:
    """``alpha=0.1,n_sink=4`` or ``prune_layers=[1,3],prune_ratios=[0.6,0.8]`` -> keyword arguments.

    Commas inside brackets belong to the value; numbers, lists (as tuples), true/false/null are JSON.
    """
    items, depth, start, text = [], 0, 0, text or ""
    for i, ch in enumerate(text + ","):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise SystemExit(f"kvprune: error: --params has unbalanced brackets: {text!r}")
    out: dict[str, Any] = {}
    for item in (x.strip() for x in items):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SystemExit(f"kvprune: error: --params takes key=value pairs separated by commas; got {item!r}")
        value = value.strip()
        if value[:1].isdigit() or value[:1] in "-[" or value in ("true", "false", "null"):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as err:
                raise SystemExit(f"kvprune: error: --params {key.strip()}={value!r} is not a number or list: {err}") from None
            value = tuple(parsed) if isinstance(parsed, list) else parsed
        out[key.strip()] = value
    return out


_OMITTED: Any = object()  # --budget not given


def _policy_budget(policy: str, budget: int | float | None, default: int | float) -> int | float | None:
    """``--budget`` as given, or when omitted: none for unbudgeted policies (full, lazyllm), else ``default``."""
    from .compare import UNBUDGETED

    if budget is _OMITTED:
        return None if policy in UNBUDGETED else default
    return budget


def load_model(spec: str, attn: str = "sdpa"):
    """``demo`` (the embedded QA model), ``stories260k`` (the shared fixture) or a local/hub path."""
    import torch

    if spec == "demo":
        from ..demo import load_demo_model

        return load_demo_model(attn_implementation=attn)
    if spec == "stories260k":
        from ..integrations.llama2c import default_stories260k_path, load_llama2c

        return load_llama2c(default_stories260k_path(), attn_implementation=attn), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(spec, attn_implementation=attn, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(spec)


def _examples(args) -> list[dict[str, Any]] | str:
    if args.file:
        from .loaders import load_ruler_jsonl

        return load_ruler_jsonl(args.file)
    return args.task


def cmd_compare(args) -> int:
    from .compare import compare, plot_quality_vs_budget

    model, tokenizer = load_model(args.model, args.attn)
    task = "fidelity" if tokenizer is None and not args.file else _examples(args)
    df = compare(
        model, tokenizer, task=task, policies=args.policies, budgets=args.budgets,
        n_examples=args.n_examples, lengths=args.lengths, seed=args.seed, batch_size=args.batch_size,
        n_sequences=args.sequences, sequence_length=args.sequence_length, progress=not args.quiet,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "compare.csv", index=False)
    df.to_json(out / "compare.json", orient="records", indent=1)
    metric = "exact_match" if "exact_match" in set(df["metric"]) else "nll_increase"
    rows = df[df["metric"] == metric]
    table = rows[rows["policy"] != "full"].pivot_table(index="policy", columns="budget", values="value")
    print(f"\n{metric} by policy and KV budget ({args.model}):")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    full = rows[rows["policy"] == "full"]
    if len(full):
        print(f"full cache: {float(full['value'].mean()):.3f}")
    for policy, group in rows[(rows["policy"] != "full") & rows["budget"].isna()].groupby("policy"):
        print(f"{policy} (no KV budget): {float(group['value'].mean()):.3f}")
    fig = plot_quality_vs_budget(df, metric=metric)
    fig.savefig(out / "compare.png", dpi=120)
    print(f"\nwrote {out / 'compare.csv'}, {out / 'compare.json'}, {out / 'compare.png'}")
    return 0


def cmd_longqa(args) -> int:
    from .qa import run_qa

    model, tokenizer = load_model(args.model, args.attn)
    if tokenizer is None:
        raise SystemExit("longqa needs a model with a tokenizer (use --model demo or a model path)")
    examples = _examples(args)
    if isinstance(examples, str):
        from .tasks import build_suite

        examples = build_suite(seed=args.seed, n_per_task=args.n_examples, lengths=args.lengths, tokenizer=tokenizer)
    args.budget = _policy_budget(args.policy, args.budget, 0.25)
    answers = run_qa(model, tokenizer, examples, args.policy, args.budget, batch_size=args.batch_size, **_params(args.params))
    for a in answers:
        mark = "ok " if a.correct else "BAD"
        print(f"{mark} {a.id:>16} {a.task:<18} tokens={a.prompt_tokens:<5} pred={a.prediction!r} gold={a.answer!r}")
    em = sum(a.correct for a in answers) / max(1, len(answers))
    print(f"exact match {em:.3f} over {len(answers)} examples ({args.policy}, budget {args.budget})")
    return 0


def cmd_generate(args) -> int:
    import torch

    from ..integrations import make_cache
    from ..integrations.compat import with_cache

    model, tokenizer = load_model(args.model, args.attn)
    if tokenizer is None:
        raise SystemExit("generate needs a model with a tokenizer")
    inputs = tokenizer(args.prompt, return_tensors="pt")
    args.budget = _policy_budget(args.policy, args.budget, 256)
    cache = make_cache(model, args.policy, args.budget, **_params(args.params))
    with torch.no_grad():
        out = model.generate(**inputs, **with_cache(cache), max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    stats = cache.stats()
    print(f"[{args.policy}, budget {args.budget}: {stats.tokens_seen} tokens seen, KV {stats.kv_bytes} bytes]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, model_default="demo"):
        p.add_argument("--model", default=model_default, help="demo | stories260k | a local or hub model path")
        p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("compare", help="every policy at every budget; table, CSV/JSON and a PNG plot")
    common(p)
    p.add_argument("--task", default="longqa", help="longqa (generated suite) or fidelity")
    p.add_argument("--file", help="a RULER-style JSONL file of QA examples instead of the suite")
    p.add_argument("--policies", type=_csv(str), default=list(DEFAULT_POLICIES))
    p.add_argument("--budgets", type=_csv(_budget), default=[0.1, 0.25, 0.5])
    p.add_argument("--n-examples", type=int, default=6, help="examples per task kind and length")
    p.add_argument("--lengths", type=_csv(int), default=[512, 1024])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sequences", type=int, default=8, help="fidelity: sequences sampled from the model")
    p.add_argument("--sequence-length", type=int, default=256, help="fidelity: tokens per sequence")
    p.add_argument("--out", default="kvprune-compare")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("longqa", help="one policy and budget over a QA file or the suite, per-example output")
    common(p)
    p.add_argument("--task", default="longqa", help=argparse.SUPPRESS)
    p.add_argument("--file", help="RULER-style JSONL of QA examples")
    p.add_argument("--policy", default="a2sf", choices=METHODS)
    p.add_argument("--budget", type=_budget, default=_OMITTED, help="tokens (int), fraction (float) or none; default 0.25 "
                   "(none for full and lazyllm)")
    p.add_argument("--params", help="policy parameters, e.g. alpha=0.1,n_sink=4 or prune_layers=[1,3],prune_ratios=[0.6,0.8]")
    p.add_argument("--n-examples", type=int, default=4)
    p.add_argument("--lengths", type=_csv(int), default=[512])
    p.add_argument("--batch-size", type=int, default=4)
    p.set_defaults(func=cmd_longqa)

    p = sub.add_parser("generate", help="one prompt with any local or hub model path")
    common(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--policy", default="a2sf", choices=METHODS)
    p.add_argument("--budget", type=_budget, default=_OMITTED, help="tokens (int), fraction (float) or none; default 256 "
                   "(none for full and lazyllm)")
    p.add_argument("--params", help="policy parameters, e.g. alpha=0.1 or prune_layers=[1,3],prune_ratios=[0.6,0.8]")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; a kvprune error (bad budget, parameter, architecture) prints one line and exits 2."""
    from ..errors import KVPruneError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KVPruneError as err:
        print(f"kvprune: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
