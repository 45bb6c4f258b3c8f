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
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost import slurm
from tests.multihost.launched import node_pids, run_notebook, save_outputs
from tests.multihost.netns import Host, Network
from tests.multihost.test_slurm import squeue_states
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
    run_notebook(network, client_host, NOTEBOOK, env, slurm_setup.logs)
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
        save_outputs(network, client_host, NOTEBOOK, env)
