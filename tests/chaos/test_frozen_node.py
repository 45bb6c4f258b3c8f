"""A node frozen whole (SIGSTOP of the node server and all its processes, as a
batch system's freezer does), declared dead by its client, then thawed.

Its client ends the jobs it held ``Abandoned`` (not reentrant) and, the node back,
sets its computation up there again. The jobs the frozen node still held are for
nobody then: the one running must be stopped and the one queued behind it must
never start (a job reported Abandoned, then run, could run twice if resubmitted).
A real node from the command line; the client in this process.
"""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest

from dispynb import DispyJob, JobCluster
from tests.chaos.outcomes import hold_two, wait_stopped
from tests.nodeproc import CliNode, running_node

pytestmark = pytest.mark.slow


def mark_and_hold(n: int, marks: str, release: str) -> int:
    """Write ``marks/n`` (this worker's pid), then wait for ``release`` (30 s at
    most)."""
    import os
    import time

    with open(os.path.join(marks, f".{n}"), "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(os.path.join(marks, f".{n}"), os.path.join(marks, str(n)))
    deadline = time.monotonic() + 30
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return n * n


def signal_tree(node: CliNode, signum: int) -> None:
    """Send ``signum`` to the node server and every process under it at once."""
    root = psutil.Process(node.proc.pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            continue


@pytest.mark.timeout(90)
def test_a_thawed_nodes_abandoned_jobs_are_stopped_once_its_client_is_back(
    tmp_path: Path,
) -> None:
    """Before, the thawed node ran them on: the running one to its end, then the
    queued one, as the client's new computation waited for the CPU."""
    marks, release = tmp_path / "marks", tmp_path / "release"
    marks.mkdir()
    with running_node(tmp_path / "node", cpus=1) as node:
        try:
            with JobCluster(
                mark_and_hold,
                nodes=[node.spec],
                secret=node.secret,
                pulse_interval=0.3,
                recover_file=str(tmp_path / "journal"),
            ) as cluster:
                jobs, worker = hold_two(cluster, marks, release)
                signal_tree(node, signal.SIGSTOP)
                try:
                    assert cluster.wait(timeout=30)
                finally:
                    signal_tree(node, signal.SIGCONT)
                assert [job.status for job in jobs] == [DispyJob.Abandoned] * 2
                # Back: the client sets its computation up there again, and the
                # node stops what the old one held.
                wait_stopped(worker)
                release.touch()
                assert cluster.submit(2, str(marks), str(release))() == 4
        finally:
            release.touch()
    assert not (marks / "1").exists(), "a job reported Abandoned ran afterwards"
    assert "the jobs it left are terminated" in node.log_text()
