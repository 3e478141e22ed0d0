"""Evaluation: fidelity to the full cache, long-document QA, side-by-side comparison, plots, CLI."""

from .compare import compare, plot_quality_vs_budget
from .fidelity import (
    FidelityResult,
    FullReference,
    budget_tokens,
    fidelity,
    fidelity_metrics,
    full_reference,
    sample_sequences,
    teacher_forced_log_probs,
)
from .loaders import DatasetUnavailableError, load_longbench, load_ruler_jsonl
from .qa import Answer, run_qa
from .tasks import TASKS, build_suite, exact_match, format_prompt, generate_example

__all__ = [
    "TASKS",
    "Answer",
    "DatasetUnavailableError",
    "FidelityResult",
    "FullReference",
    "budget_tokens",
    "build_suite",
    "compare",
    "exact_match",
    "fidelity",
    "fidelity_metrics",
    "format_prompt",
    "full_reference",
    "generate_example",
    "load_longbench",
    "load_ruler_jsonl",
    "plot_quality_vs_budget",
    "run_qa",
    "sample_sequences",
    "teacher_forced_log_probs",
]
