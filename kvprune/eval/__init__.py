"""Evaluation: how faithfully a pruned cache reproduces the full cache (and, later, tasks and plots)."""

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

__all__ = [
    "FidelityResult",
    "FullReference",
    "budget_tokens",
    "fidelity",
    "fidelity_metrics",
    "full_reference",
    "sample_sequences",
    "teacher_forced_log_probs",
]
