"""A ``dispynb-node`` that is stopped (SIGTERM, SIGINT, SIGHUP) while it runs jobs
tells its clients: a reentrant computation's jobs run elsewhere at once (not when
the node's drain ends), and a job that ends with the node says that the node
stopped, and why, instead of "lost". Real nodes on 127.0.0.1, real signals.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

from dispynb import DispyJob, DispyNode, JobCluster
from tests import jobs
from tests.jobs import WAIT, logged_pids, wait_for_path, wait_until
from tests.nodeproc import running_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_job_ended_by_a_stopping_node_says_the_node_stopped_and_why(
    tmp_path: Path, signum: signal.Signals
) -> None:
    marker = tmp_path / "started"
    with running_node(tmp_path / "node", "--drain-timeout", "0") as node:
        cluster = JobCluster(jobs.mark_and_sleep, nodes=[node.spec], secret=node.secret)
        try:
            job = cluster.submit(str(marker), 60)
            wait_for_path(marker)
            node.proc.send_signal(signum)
            assert job.wait(timeout=WAIT)
        finally:
            cluster.close(terminate=True)
    assert job.status == DispyJob.Abandoned
    assert job.exception == (
        f"node {node.spec} stopped: node 'cli-node' is shutting down ({signum.name})"
    ), job.exception


def test_a_node_started_under_nohup_goes_on_after_a_hangup(tmp_path: Path) -> None:
    """``nohup dispynb-node``: SIGHUP stays ignored, the node serves on."""
    with running_node(tmp_path / "node", launcher=["nohup"]) as node:
        node.proc.send_signal(signal.SIGHUP)
        with JobCluster(jobs.square, nodes=[node.spec], secret=node.secret) as cluster:
            assert cluster.submit(3)() == 9
        assert node.proc.poll() is None


def test_a_stopping_node_moves_reentrant_jobs_elsewhere_at_once(tmp_path: Path) -> None:
    """The node would let running jobs go on for 30 s (its default drain): the
    reentrant job moves to the other node now, and runs there to its end."""
    log = tmp_path / "runs"
    starts: list[str] = []
    lock = threading.Lock()

    def cluster_status(status: int, node: DispyNode | None, job: object) -> None:
        if status == DispyJob.Running and node is not None:
            with lock:
                starts.append(node.name)

    with (
        running_node(tmp_path / "a", name="node-a") as first,
        running_node(tmp_path / "b", name="node-b") as second,
    ):
        nodes = {"node-a": first, "node-b": second}
        cluster = JobCluster(
            jobs.log_and_sleep,
            nodes=[first.spec, second.spec],
            secret=first.secret,
            reentrant=True,
            cluster_status=cluster_status,
        )
        try:
            wait_until(lambda: len(cluster.status().nodes) == 2)
            job = cluster.submit(str(log), 3)
            wait_until(lambda: len(logged_pids(log)) == 1 and len(starts) == 1)
            stopping = nodes[starts[0]]
            stopping.proc.send_signal(signal.SIGTERM)
            # Moved at once: well within the stopped node's 30 s drain.
            wait_until(lambda: len(logged_pids(log)) == 2, timeout=WAIT)
            assert stopping.proc.wait(WAIT) == 0
            assert job.wait(timeout=WAIT)
        finally:
            cluster.close(terminate=True)
    assert job.status == DispyJob.Finished, job.exception
    assert len(starts) == 2 and starts[0] != starts[1], starts
