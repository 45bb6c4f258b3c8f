"""`SlurmNodes.adapt` against a real SLURM (munged, slurmctld on h4 with the client
program, three slurmd on h1-h3): the scenario of `launched.adapt_client`, as over SSH
(test_ssh_adapt.py): a burst grows the batch jobs from the minimum to
the maximum, an idle period shrinks them back (``scancel`` after the drain), and a node
drained while its long job runs finishes that job before it is cancelled.

The scale-up and scale-down times are printed (``-s``), never asserted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost import slurm
from tests.multihost.launched import adapt_client, check_adapted, node_pids
from tests.multihost.netns import Network, start_client, wait_for

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def slurm_env(
    network: Network, monkeypatch: pytest.MonkeyPatch
) -> Iterator[slurm.SlurmSetup]:
    reason = slurm.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with slurm.slurm_cluster(network, network.hosts[-1], network.hosts[:-1]) as setup:
        monkeypatch.setenv("SLURM_CONF", str(setup.config))  # the client inherits it
        yield setup


CLIENT = adapt_client(
    """
from dispynb.deploy import SlurmNodes


def make_nodes(args):
    return SlurmNodes(
        0, cpus=1, walltime="10", partition="debug", log_directory=args["logs"]
    )
"""
)


def test_slurm_nodes_adapt_to_a_burst_and_an_idle_period(
    network: Network, slurm_env: slurm.SlurmSetup, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    args = {"dir": str(tmp_path), "logs": str(logs)}
    client = start_client(network, network.hosts[-1], tmp_path, CLIENT, args)
    try:
        out = client.result(260)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{slurm_env.logs()}") from None
    finally:
        client.stop()
    # SLURM: the drained node's batch job is cancelled after its job (scancel)
    check_adapted(out, client.stderr, "SLURM")
    for host in network.hosts[:-1]:
        wait_for(lambda host=host: node_pids(host) == [], 30, f"no node on {host.ip}")
