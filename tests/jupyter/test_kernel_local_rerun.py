"""A notebook's cell ``local = LocalCluster(...)`` run again: the LocalCluster it
replaced stops its nodes, unless a JobCluster still runs on it.

The first one's nodes ran on, unreferenced, until the kernel exited: LocalCluster
registered its ``close`` with atexit, which held it. A script's LocalCluster left
open is still closed at exit, after the JobClusters on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from tests.jobs import WAIT
from tests.jupyter.kernel import ROOT, Kernel, kernel

pytestmark = pytest.mark.slow

START = "from dispynb import JobCluster, LocalCluster\nimport gc\n"
CELL = "local = LocalCluster(2, cpus=1)"
DOUBLE = "def double(x):\n    return 2 * x\n"


def _nodes(k: Kernel, expression: str) -> list[psutil.Process]:
    """The node processes of the LocalCluster ``expression`` names in ``k``."""
    return [psutil.Process(pid) for pid in k.value(f"{expression}.pids")]


def test_a_local_cluster_replaced_in_a_notebook_stops_its_nodes(tmp_path: Path):
    with kernel(tmp_path) as k:
        k.run_ok(START + DOUBLE + CELL)
        first = _nodes(k, "local")
        k.run_ok(CELL + "\ngc.collect()")  # the same cell, run again
        _gone, alive = psutil.wait_procs(first, timeout=WAIT)
        assert alive == []
        second = _nodes(k, "local")
        assert all(node.is_running() for node in second)
        out = k.run_ok(
            "with JobCluster(double, nodes=local) as cluster:\n"
            "    print(cluster.submit(21)())"
        )
        assert out.stdout == "42\n"


def test_a_replaced_local_cluster_stays_while_a_job_cluster_runs_on_it(
    tmp_path: Path,
):
    with kernel(tmp_path) as k:
        k.run_ok(START + DOUBLE + CELL + "\ncluster = JobCluster(double, nodes=local)")
        first = _nodes(k, "local")
        k.run_ok(CELL + "\ngc.collect()")
        assert k.value("cluster.submit(4)()") == 8  # its nodes still serve it
        assert all(node.is_running() for node in first)
        k.run_ok("cluster.close()\ndel cluster\ngc.collect()")
        _gone, alive = psutil.wait_procs(first, timeout=WAIT)
        assert alive == []
        assert all(node.is_running() for node in _nodes(k, "local"))


LEFT_OPEN = textwrap.dedent(
    """
    import atexit, gc
    from dispynb import JobCluster, LocalCluster

    def double(x):
        return 2 * x

    if __name__ == "__main__":
        # Registered first, so run last: after dispynb's own exit hooks.
        atexit.register(lambda: print("at exit", local.closed, local.pids))
        local = LocalCluster(cpus=1)
        cluster = JobCluster(double, nodes=LocalCluster(cpus=1))  # no name kept
        gc.collect()
        print(cluster.submit(21)())
    """
)


def test_a_script_s_local_clusters_left_open_close_at_exit(tmp_path: Path):
    """One only a JobCluster holds serves it; each closes at exit, after the
    JobCluster (before, each node's leaving was warned of)."""
    script = tmp_path / "script.py"
    script.write_text(LEFT_OPEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPYNB_")}
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        "42\nat exit True []\n",
        "",
    )
