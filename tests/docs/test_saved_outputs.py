"""The stored outputs of the notebook CI cannot run (SLURM's: written by
tests/multihost/test_slurm_notebook.py with ``DISPYNB_SAVE_NOTEBOOK=1``, shown as they
are on the documentation site) still show what the code prints, and no path of the
machine that wrote them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dispynb.deploy import SlurmNodes
from tests.multihost.launched import NEUTRAL_PYTHON

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "09-slurm-nodes.ipynb"


def test_slurm_notebook_shows_the_job_script_slurm_nodes_writes() -> None:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    (cell,) = [c for c in cells if "print(nodes.job_script())" in "".join(c["source"])]
    assert 'SlurmNodes(2, cpus=2, memory="200M", walltime="10"' in "".join(
        cell["source"]
    )
    shown = "".join(
        "".join(out["text"]) for out in cell["outputs"] if out.get("name") == "stdout"
    )
    nodes = SlurmNodes(
        0, cpus=2, memory="200M", walltime="10", python=NEUTRAL_PYTHON,
        register_host="127.0.0.1",
    )  # fmt: skip
    try:
        assert shown == nodes.job_script() + "\n"  # print()'s
    finally:
        nodes.close()


def test_slurm_notebook_names_no_path_of_this_machine() -> None:
    text = NOTEBOOK.read_text()
    for path in (sys.executable, sys.prefix, str(ROOT), "/tmp/"):
        assert path not in text, path
