"""The ``kvprune`` command: ``compare`` policies, run ``longqa`` with one policy, ``generate`` from a prompt.

Every argument is checked before any model loads; a bad one prints one line and exits with status 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from ..policies import METHODS, budget_kind, methods
from .compare import DEFAULT_POLICIES
from .qa import PROTOCOLS, with_tokenizer


class _Parser(argparse.ArgumentParser):
    """Every bad argument ends in one line on stderr and exit status 2 (no usage dump, no traceback)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"kvprune: error: {message} (see {self.prog} --help)\n")


def _budget(text: str) -> int | float | None:
    """A budget as the API takes it (int tokens, float ratio, none), validated now, before any work."""
    from ..caches import Budget
    from ..errors import InvalidBudgetError

    t = text.strip()
    if t.lower() in ("none", "full"):
        return None
    try:
        value: int | float = float(t) if any(c in t for c in ".eE") else int(t)
        Budget.parse(value)
    except (ValueError, InvalidBudgetError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a budget: an int token count >= 1, a float ratio in (0, 1), or none"
        ) from None
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def _method(text: str) -> str:
    name = text.strip().lower()
    if name not in methods():
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; valid (any case): {', '.join(methods())}")
    return name


def _csv(kind):
    def parse(text: str) -> list:
        items = [kind(t) for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r} names nothing; give a comma-separated list")
        return items

    parse.__name__ = getattr(kind, "__name__", "list").lstrip("_")
    return parse


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
        raise CLIError(f"--params has unbalanced brackets: {text!r}")
    out: dict[str, Any] = {}
    for item in (x.strip() for x in items):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise CLIError(f"--params takes key=value pairs separated by commas; got {item!r}")
        value = value.strip()
        if value[:1].isdigit() or value[:1] in "-[" or value in ("true", "false", "null"):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as err:
                raise CLIError(f"--params {key.strip()}={value!r} is not a number or list: {err}") from None
            value = tuple(parsed) if isinstance(parsed, list) else parsed
        out[key.strip()] = value
    return out


_OMITTED: Any = object()  # --budget not given


def _policy_budget(policy: str, budget: int | float | None, default: int | float) -> int | float | None:
    """``--budget`` as given, or when omitted: none for methods without a budget (full, lazyllm), else ``default``."""
    if budget is _OMITTED:
        return None if budget_kind(policy) == "none" else default
    return budget


MODELS = ("demo", "stories260k", "smollm2")


def check_model_spec(spec: str) -> None:
    """Refuse a ``--model`` that is neither a known name nor a local model folder, before anything loads."""
    if spec in MODELS:
        return
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise CLIError(f"--model {spec!r} is not a model: use {', '.join(MODELS)}, or a local folder holding "
                       "config.json and weights (a hub id like org/name needs a network)")


class CLIError(Exception):
    """A bad command-line input found before any work: printed as one line, exit status 2."""


def load_model(spec: str, attn: str = "sdpa"):
    """``demo`` (the embedded QA model), ``stories260k`` (the shared fixture), ``smollm2`` (SmolLM2-135M-Instruct
    from its wheel) or a local/hub path."""
    import torch

    if spec == "demo":
        from ..models import load_demo_model

        return load_demo_model(attn_implementation=attn)
    if spec == "stories260k":
        from ..models.llama2c import default_stories260k_path, load_llama2c

        path = default_stories260k_path()
        if not path.is_file():
            raise CLIError(f"the stories260K fixture is not at {path} (set KVPRUNE_STORIES260K to its path)")
        return load_llama2c(path, attn_implementation=attn), None
    if spec == "smollm2":
        from ..models import load_smollm2

        return load_smollm2(attn_implementation=attn)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(spec, attn_implementation=attn, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise CLIError(f"could not load --model {spec!r}: {str(err).splitlines()[0]}") from None


def _task_for(args, tokenizer) -> str:
    """``--task auto``: the real-text suite for chat models, the synthetic suite for the demo, fidelity without a tokenizer."""
    if args.task != "auto":
        return args.task
    if tokenizer is None:
        return "fidelity"
    return "realtext" if getattr(tokenizer, "chat_template", None) else "longqa"


def _examples(args) -> list[dict[str, Any]] | None:
    """The ``--file`` examples, read and checked before the model loads (None: the generated suite)."""
    if not args.file:
        return None
    from .loaders import load_ruler_jsonl

    try:
        examples = load_ruler_jsonl(args.file)
    except (ValueError, KeyError, TypeError) as err:
        raise CLIError(f"--file {args.file}: {err}") from None
    if not examples:
        raise CLIError(f"--file {args.file} holds no examples")
    return examples


def _check_context(model, args, task: Any = "longqa") -> None:
    """Refuse prompt (or fidelity sequence) lengths beyond the model's positions (after loading it, before any work)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    lengths = [args.sequence_length] if task == "fidelity" else (getattr(args, "lengths", None) or [])
    if limit and not getattr(args, "file", None) and lengths and max(lengths) + 64 > limit:
        raise CLIError(f"--lengths {max(lengths)} leaves no room to answer within this model's {limit} positions; "
                       f"give lengths <= {limit - 64}")


def cmd_compare(args) -> int:
    from .compare import compare, plot_quality_vs_budget

    examples = _examples(args)
    model, tokenizer = load_model(args.model, args.attn)
    task = examples if examples is not None else _task_for(args, tokenizer)
    _check_context(model, args, task)
    if task in ("longqa", "realtext") and tokenizer is None:
        raise CLIError(f"--task {task} needs a model with a tokenizer (demo, smollm2 or a model folder)")
    protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    df = compare(
        model, tokenizer, task=task, policies=args.policies, budgets=args.budgets,
        n_examples=args.n_examples, lengths=args.lengths, seed=args.seed, batch_size=args.batch_size,
        n_sequences=args.sequences, sequence_length=args.sequence_length, progress=not args.quiet,
        protocol=protocols, tasks=args.tasks,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "compare.csv", index=False)
    df.to_json(out / "compare.json", orient="records", indent=1)
    metric = next(m for m in ("exact_match", "accuracy", "nll_increase") if m in set(df["metric"]))
    overall = df[(df["metric"] == metric) & (df["task"] == df["task"].iloc[0])]  # the all-tasks rows
    for protocol, rows in overall.groupby("protocol", dropna=False, sort=False):
        head = "" if protocol != protocol else f", {protocol}"  # NaN protocol (fidelity): no label
        table = rows[rows["policy"] != "full"].pivot_table(index="policy", columns="budget", values="value")
        print(f"\n{metric} by policy and KV budget ({args.model}{head}):")
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

    examples = _examples(args)
    model, tokenizer = load_model(args.model, args.attn)
    _check_context(model, args)
    if tokenizer is None:
        raise CLIError("longqa needs a model with a tokenizer (demo, smollm2 or a model folder)")
    prompt = None
    if examples is None:
        if _task_for(args, tokenizer) == "realtext":
            from .realtext import build_real_suite

            examples = build_real_suite(tokenizer, seed=args.seed, n_per_task=args.n_examples, lengths=args.lengths)
        else:
            from .tasks import build_suite

            examples = build_suite(seed=args.seed, n_per_task=args.n_examples, lengths=args.lengths, tokenizer=tokenizer)
    if getattr(tokenizer, "chat_template", None):
        from .realtext import chat_prompt

        prompt = chat_prompt(tokenizer)
    args.budget = _policy_budget(args.policy, args.budget, 0.25)
    extra = {"prompt": prompt, "stop_strings": ()} if prompt is not None else {}
    answers = run_qa(model, tokenizer, examples, args.policy, args.budget, batch_size=args.batch_size,
                     protocol=args.protocol, **extra, **_params(args.params))
    for a in answers:
        mark = "ok " if a.correct else "BAD"
        print(f"{mark} {a.id:>16} {a.task:<18} tokens={a.prompt_tokens:<5} pred={a.prediction!r} gold={a.answer!r}")
    acc = sum(a.correct for a in answers) / max(1, len(answers))
    print(f"accuracy {acc:.3f} over {len(answers)} examples ({args.policy}, budget {args.budget}, {args.protocol})")
    return 0


def cmd_generate(args) -> int:
    import torch

    from ..integrations import make_cache
    from ..integrations.compat import with_cache

    model, tokenizer = load_model(args.model, args.attn)
    if tokenizer is None:
        raise CLIError("generate needs a model with a tokenizer (demo, smollm2 or a model folder)")
    text = args.prompt
    if getattr(tokenizer, "chat_template", None) and not args.raw:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt")
    args.budget = _policy_budget(args.policy, args.budget, 256)
    cache = make_cache(model, args.policy, args.budget, **with_tokenizer(args.policy, _params(args.params), tokenizer))
    with torch.no_grad():
        out = model.generate(**inputs, **with_cache(cache), max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    stats = cache.stats()
    print(f"[{args.policy}, budget {args.budget}: {stats.tokens_seen} tokens seen, KV {stats.kv_bytes} bytes]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p, model_default="demo"):
        p.add_argument("--model", default=model_default, help="demo | stories260k | smollm2 | a local model folder")
        p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
        p.add_argument("--seed", type=int, default=0)

    tasks = ["auto", "longqa", "realtext", "fidelity"]
    task_help = ("auto (realtext for chat models such as smollm2, longqa for the demo, fidelity without a tokenizer), "
                 "longqa (the synthetic suite), realtext (the real-prose suite), fidelity")
    p = sub.add_parser("compare", help="every policy at every budget; table, CSV/JSON and a PNG plot")
    common(p)
    p.add_argument("--task", default="auto", choices=tasks, help=task_help)
    p.add_argument("--file", help="a RULER-style JSONL file of QA examples instead of the suite")
    p.add_argument("--policies", type=_csv(_method), default=list(DEFAULT_POLICIES))
    p.add_argument("--budgets", type=_csv(_budget), default=[0.1, 0.25, 0.5])
    p.add_argument("--protocol", default="query_agnostic", choices=[*PROTOCOLS, "both"],
                   help="query_agnostic: context compressed before the question is read; query_aware: question in the "
                        "compressed prompt; both")
    p.add_argument("--n-examples", type=_positive_int, default=None,
                   help="examples per task kind and length (default 6; 2 for realtext)")
    p.add_argument("--lengths", type=_csv(_positive_int), default=None,
                   help="prompt lengths in tokens (default 512,1024; 1024 for realtext)")
    p.add_argument("--tasks", type=_csv(str), default=None,
                   help="task kinds of the suite (default: all for longqa; for realtext the ones SmolLM2 can do with "
                        "the full cache at 1K: " + ",".join(REALTEXT_DEFAULT_TASKS) + ")")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--sequences", type=_positive_int, default=8, help="fidelity: sequences sampled from the model")
    p.add_argument("--sequence-length", type=_positive_int, default=256, help="fidelity: tokens per sequence")
    p.add_argument("--out", default="kvprune-compare")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("longqa", help="one policy and budget over a QA file or the suite, per-example output")
    common(p)
    p.add_argument("--task", default="auto", choices=["auto", "longqa", "realtext"], help=argparse.SUPPRESS)
    p.add_argument("--file", help="RULER-style JSONL of QA examples")
    p.add_argument("--policy", default="a2sf", type=_method, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--budget", type=_budget, default=_OMITTED, help="tokens (int), fraction (float) or none; default 0.25 "
                   "(none for full and lazyllm)")
    p.add_argument("--protocol", default="query_agnostic", choices=list(PROTOCOLS))
    p.add_argument("--params", help="policy parameters, e.g. alpha=0.1,n_sink=4 or prune_layers=[1,3],prune_ratios=[0.6,0.8]")
    p.add_argument("--n-examples", type=_positive_int, default=4)
    p.add_argument("--lengths", type=_csv(_positive_int), default=None, help="default 512 (1024 for realtext)")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.set_defaults(func=cmd_longqa)

    p = sub.add_parser("generate", help="one prompt with any local or hub model path")
    common(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    p.add_argument("--policy", default="a2sf", type=_method, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--budget", type=_budget, default=_OMITTED, help="tokens (int), fraction (float) or none; default 256 "
                   "(none for full and lazyllm)")
    p.add_argument("--params", help="policy parameters, e.g. alpha=0.1 or prune_layers=[1,3],prune_ratios=[0.6,0.8]")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.set_defaults(func=cmd_generate)
    return parser


#: realtext tasks SmolLM2-135M-Instruct answers with the full cache at 1K tokens (BENCHMARKS.md, real model)
REALTEXT_DEFAULT_TASKS = ("niah_single", "niah_multikey", "vartrack")


def _validate(args) -> None:
    """Checks that need several arguments together, before any model loads."""
    check_model_spec(args.model)
    if args.attn == "flash_attention_2":
        from ..integrations.prepare import check_backend

        check_backend("flash_attention_2")  # flash-attn and CUDA, named in one line instead of a loader traceback
    out = getattr(args, "out", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise CLIError(f"--out {out!r} is a file; give a folder for compare.csv, compare.json and compare.png")
    if getattr(args, "prompt", None) is not None and not args.prompt.strip():
        raise CLIError("--prompt is empty; give the text to continue")
    realtext = args.model == "smollm2" or getattr(args, "task", None) == "realtext"
    if args.command == "compare":
        if args.n_examples is None:
            args.n_examples = 2 if realtext else 6
        if args.tasks is None and realtext and not args.file:
            args.tasks = list(REALTEXT_DEFAULT_TASKS)
        if args.tasks:
            from .realtext import REAL_TASKS
            from .tasks import TASKS

            valid = REAL_TASKS if realtext else TASKS
            unknown = [t for t in args.tasks if t not in valid]
            if unknown:
                raise CLIError(f"--tasks {','.join(unknown)}: unknown; valid here: {', '.join(valid)}")
    if getattr(args, "lengths", None) is None and hasattr(args, "lengths"):
        args.lengths = [1024] if realtext else ([512, 1024] if args.command == "compare" else [512])
    if getattr(args, "lengths", None) and not getattr(args, "file", None):
        shortest = 256 if realtext else 64
        if min(args.lengths) < shortest:
            raise CLIError(f"--lengths {min(args.lengths)} is too short for the {'real-text' if realtext else 'synthetic'} "
                           f"suite; give prompt lengths >= {shortest} tokens")
    params = _params(getattr(args, "params", None))  # a CLIError on bad syntax
    budget = getattr(args, "budget", _OMITTED)
    policy = getattr(args, "policy", None)
    if policy is not None and budget is not _OMITTED:
        if budget_kind(policy) == "none" and budget is not None:
            raise CLIError(f"--policy {policy} takes no budget (it keeps every token in memory); drop --budget or "
                           "pass --budget none")
    if policy is not None and params:
        _check_params(policy, params)


def _check_params(policy: str, params: dict[str, Any]) -> None:
    """Build the method's configuration from its parameters once, so a bad one is refused before the model loads."""
    from ..policies import check_params

    check_params(policy, params)


def main(argv: list[str] | None = None) -> int:
    """Run a command; any bad input (argument, file, model, budget, parameter) prints one line and exits 2."""
    from ..errors import KVPruneError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad argument, already reported in one line (2)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    try:
        _validate(args)
        return int(args.func(args))
    except (KVPruneError, CLIError) as err:
        kind = "" if isinstance(err, CLIError) else f"{type(err).__name__}: "
        print(f"kvprune: error: {kind}{err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
