"""``notebooks/09-slurm-nodes.ipynb`` under nbval, its kernel on namespace host h4
(SLURM's controller, the "login node") and three ``slurmd`` on h1-h3: the notebook a
user runs, against a real SLURM.

The notebook is collected only with ``SLURM_CONF`` set (its metadata says so, see
notebooks/conftest.py), so the plain test run skips it and this test runs it where a
SLURM exists. With ``DISPYNB_SAVE_NOTEBOOK=1`` the executed notebook is written back
(its outputs are what the documentation site shows, as the site cannot run it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost import slurm
from tests.multihost.netns import Host, Network
from tests.multihost.test_slurm import node_pids, squeue_states
from tests.nodeproc import ROOT, node_env

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(300)]

NOTEBOOK = ROOT / "notebooks" / "09-slurm-nodes.ipynb"


@pytest.fixture
def slurm_setup(network: Network) -> Iterator[slurm.SlurmSetup]:
    reason = slurm.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with slurm.slurm_cluster(network, network.hosts[-1], network.hosts[:-1]) as setup:
        yield setup


def test_slurm_notebook_runs_under_nbval(
    network: Network,
    client_host: Host,
    slurm_setup: slurm.SlurmSetup,
    tmp_path: Path,
) -> None:
    env = node_env()
    env["SLURM_CONF"] = str(slurm_setup.config)
    # SLURM's default output (slurm-<id>.out) would go to the notebook's directory
    env["SBATCH_OUTPUT"] = str(tmp_path / "slurm-%j.out")
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    argv += ["--timeout", "240", str(NOTEBOOK)]
    proc = network.popen(
        client_host,
        argv,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=270)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"{out}\n{slurm_setup.logs()}"
    cells = sum(1 for c in NOTEBOOK.read_text().split('"cell_type": "code"')[1:])
    assert f"{cells} passed" in out, out
    # every batch job it submitted ended, cancelled, and no node server is left
    listed = slurm.slurm_command(
        network, client_host, slurm_setup, "squeue", "--noheader", "--states=all",
        "--format=%i",
    ).stdout.split()  # fmt: skip
    assert len(listed) >= 7  # 2 (%dispy slurm) + 2 (SlurmNodes) + 3 (adapt)
    assert set(squeue_states(network, slurm_setup, listed).values()) == {"CANCELLED"}
    for host in network.hosts[:-1]:
        assert node_pids(host) == []
    if os.environ.get("DISPYNB_SAVE_NOTEBOOK"):
        save_outputs(client_host, env)


def save_outputs(client_host: Host, env: dict[str, str]) -> None:
    """Execute the notebook once more with nbclient and store its outputs."""
    code = (
        "import nbformat, nbclient, sys\n"
        "nb = nbformat.read(sys.argv[1], as_version=4)\n"
        "nbclient.NotebookClient(nb, timeout=45, kernel_name='python3',"
        " resources={'metadata': {'path': sys.argv[2]}}).execute()\n"
        "nbformat.write(nb, sys.argv[1])\n"
    )
    done = subprocess.run(
        client_host.command(
            [sys.executable, "-c", code, str(NOTEBOOK), str(NOTEBOOK.parent)]
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=270,
        check=False,
    )
    assert done.returncode == 0, done.stderr
