"""The example notebooks as the lab panel shows them: one card per cluster, each
card telling its cluster apart from the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dispynb.jupyter.labcomm import ClusterTracker

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"

pytestmark = pytest.mark.slow


def test_quick_start_run_and_cluster_cards_have_different_names():
    """Before: the `Run` and the plain `JobCluster` of notebook 01 were both
    "collatz_steps" in the panel."""
    cells = json.loads((NOTEBOOKS / "01-quickstart.ipynb").read_text())["cells"]
    tracker = ClusterTracker()
    namespace: dict[str, object] = {"__name__": "__main__"}
    try:
        for cell in cells:
            if cell["cell_type"] == "code":
                exec("".join(cell["source"]), namespace)
        tracker.refresh()
        names = [card["name"] for card in tracker.snapshots()]
    finally:
        tracker.close()
        local = namespace.get("local")
        if local is not None:
            local.close()  # type: ignore[attr-defined]
    assert len(names) == 2, names
    assert len(set(names)) == 2, names
