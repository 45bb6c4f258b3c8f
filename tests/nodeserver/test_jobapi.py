"""What jobs (and cleanup) call on the node: ``dispynode_logger`` and
``dispynode_shutdown()``, on nodes started from the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from tests.jobs import WAIT, wait_until
from tests.nodeproc import NODE_WAIT, running_node, start_node

pytestmark = pytest.mark.slow


def log_to_node(n: int) -> int:
    dispynode_logger.info("job %d says hello to the node's console", n)  # type: ignore[name-defined]  # noqa: F821
    print("to the job's stdout")
    return n


def shut_the_node_down() -> int:
    return dispynode_shutdown()  # type: ignore[name-defined]  # noqa: F821


def test_dispynode_logger_writes_to_the_node_log_not_the_job(tmp_path: Path) -> None:
    with running_node(tmp_path / "node") as node:
        with JobCluster(log_to_node, nodes=[node.spec], secret=node.secret) as cluster:
            job = cluster.submit(7)
            assert job() == 7
        assert job.stdout == "to the job's stdout\n"
        assert job.stderr == ""
        wait_until(lambda: "job 7 says hello to the node's console" in node.log_text())
        line = next(
            line for line in node.log_text().splitlines() if "job 7 says" in line
        )
        assert " dispynode INFO " in line


def test_dispynode_shutdown_is_refused_without_client_shutdown(tmp_path: Path) -> None:
    with running_node(tmp_path / "node") as node:
        with JobCluster(
            shut_the_node_down, nodes=[node.spec], secret=node.secret
        ) as cluster:
            assert cluster.submit()() == 0  # the request was sent...
            wait_until(lambda: "ignored" in node.log_text())
            assert "--client_shutdown" in node.log_text()
            # ... and refused: the node goes on serving.
            job = cluster.submit()
            assert job.wait(WAIT) and job.status == DispyJob.Finished
        assert node.proc.poll() is None


def test_dispynode_shutdown_from_a_job_stops_a_client_shutdown_node(
    tmp_path: Path,
) -> None:
    node = start_node(tmp_path / "node", "--client_shutdown")
    try:
        cluster = JobCluster(shut_the_node_down, nodes=[node.spec], secret=node.secret)
        try:
            job = cluster.submit()
            # The node drains: the calling job still finishes and its result arrives.
            assert job.wait(WAIT)
            assert (job.status, job.result) == (DispyJob.Finished, 0)
            assert node.proc.wait(NODE_WAIT) == 0
        finally:
            cluster.close(terminate=True)
        assert "the node stops (--client_shutdown)" in node.log_text()
    finally:
        node.stop()


def test_dispynode_shutdown_from_cleanup_stops_the_node_at_close(
    tmp_path: Path,
) -> None:
    def cleanup() -> None:
        dispynode_shutdown()  # type: ignore[name-defined]  # noqa: F821

    node = start_node(tmp_path / "node", "--client_shutdown")
    try:
        with JobCluster(
            log_to_node, nodes=[node.spec], secret=node.secret, cleanup=cleanup
        ) as cluster:
            assert cluster.submit(1)() == 1
            assert node.proc.poll() is None  # cleanup runs at close
        assert node.proc.wait(NODE_WAIT) == 0
    finally:
        node.stop()
