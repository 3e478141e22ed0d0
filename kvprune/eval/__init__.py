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
from .qa import Answer, exact_match, run_qa

__all__ = [
    "Answer",
    "FidelityResult",
    "FullReference",
    "budget_tokens",
    "compare",
    "exact_match",
    "fidelity",
    "fidelity_metrics",
    "full_reference",
    "plot_quality_vs_budget",
    "run_qa",
    "sample_sequences",
    "teacher_forced_log_probs",
]
