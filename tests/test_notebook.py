"""The example notebook executes end to end on the demo model (nbclient)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "policy_comparison.ipynb"


def test_policy_comparison_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is in the dev extra")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is in the dev extra")
    from kvprune.demo import DEMO_MODEL_PATH

    if not (DEMO_MODEL_PATH / "config.json").is_file():
        pytest.skip(f"demo model absent at {DEMO_MODEL_PATH} (scripts/train_demo.py makes it)")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "policy_comparison.png").stat().st_size > 1000
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "predicted:" in outputs and "KV bytes:" in outputs
    from kvprune.models import smollm2_available

    if smollm2_available():  # the real-model section ran: both protocols, both policies
        assert "query_agnostic" in outputs and "query_aware" in outputs and "tova" in outputs
    else:
        assert "skipped: SmolLM2 is not installed" in outputs
