"""Policies side by side: quality against KV budget as a tidy DataFrame, and its plot."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch

from ..errors import InvalidBudgetError
from ..policies import budget_kind, check_params, methods

DEFAULT_POLICIES: tuple[str, ...] = (
    "a2sf", "h2o", "spatten", "lazyllm", "tova", "snapkv", "observed", "keydiff", "kvzip", "streaming", "knorm",
    "random",
)
DEFAULT_BUDGETS: tuple[float, ...] = (0.1, 0.25, 0.5)
COLUMNS = ["task", "protocol", "policy", "budget", "metric", "value", "kv_bytes", "prefill_s", "decode_s", "n"]
#: small protected windows so that low budgets on short documents stay valid
#: SpAtten prunes from layer 1 on, so that small models (4-6 layers) can reach low KV fractions
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "snapkv": {"window": 16}, "streaming": {"n_sink": 4}, "spatten": {"token_start": 0.0},
}


def _policy_params(name: str, params: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    merged = {**DEFAULT_PARAMS, **(params or {})}
    return dict(merged.get(name, {}))


def _qa_rows(model, tokenizer, examples, policy, budget, params, max_new_tokens, batch_size, tick, protocol, prompt) -> list[dict]:
    from .qa import run_qa

    extra = {"prompt": prompt, "stop_strings": ()} if prompt is not None else {}
    answers = run_qa(
        model, tokenizer, examples, policy, budget,
        max_new_tokens=max_new_tokens, batch_size=batch_size, on_batch=tick, protocol=protocol, **extra, **params,
    )
    # exact match where every example is scored by it, else RULER's containment rules: "accuracy"
    metric = "exact_match" if all(ex.get("match", "exact") == "exact" for ex in examples) else "accuracy"
    rows = []
    by_task: dict[str, list] = {}
    for a in answers:
        by_task.setdefault(a.task, []).append(a)
    for task, group in [("all", answers), *sorted(by_task.items())] if len(by_task) > 1 else [("all", answers)]:
        rows.append(
            dict(
                task=task if task != "all" else "longqa",
                protocol=protocol,
                metric=metric,
                value=sum(a.correct for a in group) / len(group),
                kv_bytes=sum(a.kv_bytes for a in group) / len(group),
                prefill_s=sum(a.prefill_s for a in group) / len(group),
                decode_s=sum(a.decode_s for a in group) / len(group),
                n=len(group),
            )
        )
    return rows


def _fidelity_rows(model, sequences, reference, prompt_len, policy, budget, params) -> list[dict]:
    from .fidelity import fidelity

    res = fidelity(model, sequences, policy, budget, prompt_len=prompt_len, reference=reference, **params)
    d = res.as_dict() if hasattr(res, "as_dict") else vars(res)
    return [
        dict(task="fidelity", metric=m, value=float(d[m]), kv_bytes=d.get("kv_bytes", math.nan),
             prefill_s=d.get("prefill_s", math.nan), decode_s=d.get("decode_s", math.nan), n=int(sequences.shape[0]))
        for m in ("nll_increase", "greedy_agreement", "kl")
    ]


def compare(
    model: torch.nn.Module,
    tokenizer: Any = None,
    task: str | Sequence[dict[str, Any]] = "longqa",
    policies: Sequence[str] = DEFAULT_POLICIES,
    budgets: Sequence[int | float] = DEFAULT_BUDGETS,
    *,
    include_full: bool = True,
    policy_params: dict[str, dict[str, Any]] | None = None,
    n_examples: int = 8,
    lengths: Sequence[int] = (512, 1024),
    seed: int = 0,
    max_new_tokens: int = 8,
    batch_size: int = 4,
    n_sequences: int = 8,
    sequence_length: int = 256,
    protocol: str | Sequence[str] = "query_agnostic",
    prompt: Callable[[dict[str, Any]], str] | None = None,
    tasks: Sequence[str] | None = None,
    progress: bool | Callable[[int], None] = False,
) -> pd.DataFrame:
    """Run every policy at every budget on ``task``; one row per (task, protocol, policy, budget, metric).

    ``task`` is ``"longqa"`` (the generated synthetic long-document QA suite, needs ``tokenizer``),
    ``"realtext"`` (the real-prose RULER-style suite of :mod:`kvprune.eval.realtext`, rendered through the
    tokenizer's chat template), a list of QA examples (``context``/``question``/``answer`` dicts), or
    ``"fidelity"`` (NLL increase, greedy agreement and KL against the full cache on sequences sampled
    from ``model``). ``protocol`` is ``"query_agnostic"`` (context compressed before the question is
    read), ``"query_aware"`` (question inside the compressed prompt) or both as a list; ``prompt``
    renders an example (default: the suite's own format; the chat template for ``"realtext"``);
    ``tasks`` picks the suite's task kinds (default: all of them).
    Budgets are token counts (int) or ratios of the tokens seen (float); for ``"spatten"`` a
    float is the fraction of KV memory kept (averaged over layers), and a budget out of its reach
    is skipped with a warning. The full cache and LazyLLM (no KV budget) appear once per protocol with
    budget NaN. Every argument is validated before any model runs. Columns: ``task, protocol, policy,
    budget, metric, value, kv_bytes, prefill_s, decode_s, n``.
    """
    from ..caches import Budget
    from ..errors import InvalidParameterError, UnknownPolicyError
    from .qa import check_protocol

    policies = [p.lower() if isinstance(p, str) else p for p in policies]
    unknown = [p for p in policies if p not in methods()]
    if unknown:
        raise UnknownPolicyError(f"unknown policies {unknown}; valid names: {', '.join(methods())}")
    protocols = [protocol] if isinstance(protocol, str) else list(protocol)
    if not protocols:
        raise InvalidParameterError("protocol names none; give 'query_agnostic', 'query_aware' or both")
    for p in protocols:
        check_protocol(p)
    for b in budgets:
        Budget.parse(b)  # raises InvalidBudgetError now, not after the full-cache baseline ran
    for p in policies:
        check_params(p, _policy_params(p, policy_params))
    if isinstance(task, str) and task not in ("longqa", "realtext", "fidelity"):
        raise InvalidParameterError(f"task must be 'longqa', 'realtext', 'fidelity' or a list of examples; got {task!r}")
    if not isinstance(task, str) and not list(task):
        raise InvalidParameterError("task is an empty list of examples")
    if task in ("longqa", "realtext") and tokenizer is None:
        raise InvalidParameterError(f"task {task!r} needs the model's tokenizer")
    runs: list[tuple[str, int | float | None]] = [("full", None)] if include_full else []
    # methods that take no KV budget (full, LazyLLM) run once, reported with budget NaN
    runs += [(p, None) for p in policies if budget_kind(p) == "none" and p != "full"]
    runs += [(p, b) for p in policies if budget_kind(p) != "none" for b in budgets]

    if task == "fidelity":
        from .fidelity import full_reference, sample_sequences

        sequences = sample_sequences(model, n_sequences, sequence_length, seed=seed)
        prompt_len = sequence_length // 2
        reference = full_reference(model, sequences, prompt_len=prompt_len)
        work = lambda p, b, proto, tick: _fidelity_rows(  # noqa: E731
            model, sequences, reference, prompt_len, p, _absolute(b, sequence_length, p), _policy_params(p, policy_params)
        )
        units = 1
        protocols = [protocols[0]]  # no question: one protocol
    else:
        if task == "longqa":
            from .tasks import build_suite

            from .tasks import TASKS

            examples = build_suite(seed=seed, n_per_task=n_examples, lengths=list(lengths), tokenizer=tokenizer,
                                   tasks=tasks or TASKS)
        elif task == "realtext":
            from .realtext import REAL_TASKS, build_real_suite, chat_prompt

            examples = build_real_suite(tokenizer, seed=seed, n_per_task=n_examples, lengths=list(lengths),
                                        tasks=tasks or REAL_TASKS)
            prompt = prompt or chat_prompt(tokenizer)
        else:
            examples = list(task)
        work = lambda p, b, proto, tick: _qa_rows(  # noqa: E731
            model, tokenizer, examples, p, b, _policy_params(p, policy_params), max_new_tokens, batch_size, tick,
            proto, prompt,
        )
        units = len(examples)
    runs = [(proto, p, b) for proto in protocols for p, b in runs]

    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs) * units, desc="kvprune compare", unit="ex")
    tick = bar.update if bar is not None else (progress if callable(progress) else None)
    rows = []
    for proto, policy, budget in runs:
        try:
            produced = work(policy, budget, proto, tick or (lambda n: None))
        except InvalidBudgetError as e:
            if budget_kind(policy) != "kv_fraction":
                raise
            # SpAtten's early layers keep every token: a low KV fraction can be out of its reach
            warnings.warn(f"spatten skipped at budget {budget}: {e}", stacklevel=2)
            produced = []
            if task != "fidelity":
                (tick or (lambda n: None))(units)
        for row in produced:
            row.setdefault("protocol", math.nan)
            rows.append({"policy": policy, "budget": math.nan if budget is None else budget, **row})
        if bar is not None and task == "fidelity":
            bar.update(1)
    if bar is not None:
        bar.close()
    return pd.DataFrame(rows, columns=COLUMNS)


def _absolute(budget: int | float | None, length: int, policy: str = "") -> int | float | None:
    """Fidelity sequences have a fixed length, so a ratio is turned into a fixed token count
    (SpAtten keeps its ratio: it is the fraction of KV memory kept, averaged over layers)."""
    if budget is None or isinstance(budget, int) or budget_kind(policy) == "kv_fraction":
        return budget
    return max(1, round(budget * length))


def plot_quality_vs_budget(df: pd.DataFrame, metric: str | None = None, task: str | None = None, ax: Any = None):
    """Line per policy of ``metric`` against budget; the full cache as a dashed line. Returns the Figure."""
    import matplotlib.pyplot as plt

    task = task or str(df["task"].iloc[0])
    sub = df[df["task"] == task]
    metric = metric or str(sub["metric"].iloc[0])
    sub = sub[sub["metric"] == metric]
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
    else:
        fig = ax.figure
    for policy, group in sub[sub["policy"] != "full"].groupby("policy"):
        group = group.sort_values("budget")
        if group["budget"].isna().all():  # a policy without a KV budget (LazyLLM): one level
            ax.axhline(float(group["value"].mean()), linestyle=":", linewidth=1.5, label=policy)
        else:
            ax.plot(group["budget"], group["value"], marker="o", label=policy)
    full = sub[sub["policy"] == "full"]
    if len(full):
        ax.axhline(float(full["value"].mean()), color="black", linestyle="--", linewidth=1, label="full cache")
    budgets = sub["budget"].dropna()
    ax.set_xlabel("KV budget (fraction of tokens seen)" if (budgets < 1).all() else "KV budget (tokens)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"{task}: {metric.replace('_', ' ')} vs KV budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
