"""`SlurmNodes.close` when slurmctld is down (killed, restarting, unreachable): a
real SLURM (munged, slurmctld, slurmd) on namespace hosts, its controller killed
under a launcher. A SLURM of this module's own: the others' needs its controller."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb.deploy.slurm import CLOSE_TIMEOUT
from tests.multihost import slurm
from tests.multihost.launched import node_pids
from tests.multihost.netns import Network, start_client, wait_for
from tests.multihost.test_slurm import wait_file

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def slurm_setup(network: Network) -> Iterator[slurm.SlurmSetup]:
    reason = slurm.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with slurm.slurm_cluster(network, network.hosts[-1], network.hosts[:-1]) as setup:
        yield setup


CLIENT = """
import json
import logging
import os
import sys
import time

from dispynb.deploy import SlurmNodes

logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(name)s %(levelname)s %(message)s")


def main(args):
    nodes = SlurmNodes(
        1, cpus=1, walltime="10", log_directory=args["logs"], exit_without_client=5
    )
    nodes.wait_for(1, 60)
    with open(args["ready"], "w") as out:
        json.dump({"jobs": [j.job_id for j in nodes.jobs]}, out)
    deadline = time.monotonic() + 60
    while not os.path.exists(args["go"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    nodes.close()
    return {"seconds": time.monotonic() - started}
"""


def test_close_with_slurmctld_down_is_short_and_says_so(
    network: Network,
    slurm_setup: slurm.SlurmSetup,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """close() with slurmctld killed took 27 s (scancel, then squeue, then the
    poller's squeue: each retries for 9 s) and up to a minute per command for an
    unreachable controller, the failed squeue unreported. Now one scancel, bounded
    by CLOSE_TIMEOUT, and one warning naming the jobs left and how they end; the
    node then ends its job by itself (exit_without_client)."""
    setup = slurm_setup
    monkeypatch.setenv("SLURM_CONF", str(setup.config))
    ready, go, logs = tmp_path / "ready.json", tmp_path / "go", tmp_path / "logs"
    logs.mkdir()
    args = {"ready": str(ready), "go": str(go), "logs": str(logs)}
    client = start_client(network, network.hosts[-1], tmp_path, CLIENT, args)
    try:
        info = wait_file(ready, client, setup, 90, "a SLURM node registered")
        controller = setup.procs["slurmctld"]
        controller.kill()
        controller.wait(10)
        go.touch()
        result = client.result(200)
    finally:
        client.stop()
    (job_id,) = info["jobs"]  # type: ignore[misc]
    # Bounded by one scancel's CLOSE_TIMEOUT (with room for a loaded machine),
    # not by a minute per SLURM command.
    assert result["seconds"] < CLOSE_TIMEOUT + 5, result
    warning = (
        f"SlurmNodes closed without cancelling SLURM job(s) {job_id} (scancel "
        "failed: scancel: error: Kill job error on job id"
    )
    assert warning in client.stderr, client.stderr
    assert "no client has been connected to it for 5 s" in client.stderr
    assert f"`scancel {job_id}` once slurmctld answers" in client.stderr
    for host in network.hosts[:-1]:
        wait_for(lambda host=host: node_pids(host) == [], 30, f"no node on {host.ip}")
