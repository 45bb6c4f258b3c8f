"""A node frozen whole (SIGSTOP of its process tree) longer than its client's
pulse timeout, then thawed while the jobs it held run again on another node
(``reentrant=True``): each job's result is reported once, the rerun's.

Both attempts of the job are released together as the frozen node thaws, so the
old one ends too and its node tries to report it: on the connection its client
closed when it declared the node dead (fenced), or on the new one once the client
is back. Two real nodes from the command line; the client in this process.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import psutil
import pytest

from dispynb import DispyJob, JobCluster
from tests.chaos.test_frozen_node import signal_tree
from tests.jobs import WAIT, wait_until
from tests.nodeproc import CliNode, running_node

pytestmark = pytest.mark.slow


def mark_attempt(n: int, marks: str, release: str) -> tuple[int, int]:
    """Write ``marks/<n>-<pid>`` (this attempt's worker), wait for ``release`` (30 s
    at most); ``(n * n, pid)``."""
    import os
    import time

    pid = os.getpid()
    open(os.path.join(marks, f"{n}-{pid}"), "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return n * n, pid


def _runs_on(pid: int, nodes: list[CliNode]) -> CliNode:
    """The node whose process tree holds the worker ``pid``."""
    parents = {p.pid for p in psutil.Process(pid).parents()}
    [node] = [node for node in nodes if node.proc.pid in parents]
    return node


@pytest.mark.timeout(120)
@pytest.mark.parametrize("journaled", [False, True], ids=["plain", "recover_file"])
def test_a_thawed_nodes_job_rerun_elsewhere_is_reported_once(
    tmp_path: Path, journaled: bool
) -> None:
    """With a recover_file the thawed node also keeps the old attempt's result for
    a client it takes for gone, until the client sets its computation up again."""
    marks, release = tmp_path / "marks", tmp_path / "release"
    marks.mkdir()
    told: list[tuple[object, int, object]] = []
    lock = threading.Lock()

    def job_status(job: DispyJob) -> None:
        with lock:
            told.append((job.id, job.status, job.result))

    with (
        running_node(tmp_path / "a", name="a") as a,
        running_node(tmp_path / "b", name="b") as b,
    ):
        try:
            with JobCluster(
                mark_attempt,
                nodes=[a.spec, b.spec],
                secret=a.secret,
                reentrant=True,
                pulse_interval=0.3,
                job_status=job_status,
                recover_file=str(tmp_path / "journal") if journaled else False,
            ) as cluster:
                wait_until(lambda: len(cluster.status().nodes) == 2, timeout=WAIT)
                job = cluster.submit(5, str(marks), str(release))
                job.id = "five"
                wait_until(lambda: len(list(marks.iterdir())) == 1, timeout=WAIT)
                [first] = list(marks.iterdir())
                frozen = _runs_on(int(first.name.split("-")[1]), [a, b])
                signal_tree(frozen, signal.SIGSTOP)
                try:
                    # Declared dead, the job runs again on the other node.
                    wait_until(lambda: len(list(marks.iterdir())) == 2, timeout=30)
                finally:
                    signal_tree(frozen, signal.SIGCONT)
                    release.touch()  # both attempts end now
                assert cluster.wait(timeout=WAIT)
                [rerun] = [m for m in marks.iterdir() if m != first]
                assert job() == (25, int(rerun.name.split("-")[1]))
                # The thawed node is used again (set up anew) and runs jobs.
                wait_until(lambda: len(cluster.status().nodes) == 2, timeout=WAIT)
                jobs = [cluster.submit(n, str(marks), str(release)) for n in range(4)]
                assert [j()[0] for j in jobs] == [0, 1, 4, 9]
        finally:
            release.touch()
    fives = [entry for entry in told if entry[0] == "five"]
    assert fives == [("five", DispyJob.Finished, job.result)], told
