"""A node stopped with SIGTERM (``systemctl stop``, Ctrl-C, SLURM's signal to the
node alone) drains: it hands back each job sent to it after that, to run elsewhere.
The scheduler stops sending it jobs at the first one handed back; before, it sent
each straight back to the same node, until the node closed with some of them, which
ended ``Abandoned`` ('node ... was lost') though they never ran."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from dispynb import SharedJobCluster
from dispynb.job import JobStatus
from tests.jobs import wait_until
from tests.nodeproc import start_node
from tests.sharedsched.harness import SchedulerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def hold(n: int, folder: str) -> int:
    """Say it started and where, then wait for the test's release of this job or
    of all (60 s at most)."""
    import os
    import time

    open(os.path.join(folder, f"started-{n}-{dispy_node_name}"), "w").close()  # type: ignore[name-defined]  # noqa: F821
    deadline = time.monotonic() + 60
    while not any(
        os.path.exists(os.path.join(folder, name)) for name in ("all", f"{n}")
    ):
        assert time.monotonic() < deadline, "never released"
        time.sleep(0.01)
    return n


def handed_back(sched: SchedulerProcess, timeout: float = 10.0) -> None:
    """Until the scheduler says a job came back from the draining node (or
    ``timeout`` passed: a scheduler that sends it the job again says nothing, and
    the jobs' statuses tell)."""
    deadline = time.monotonic() + timeout
    while "shuts down: no more jobs for it" not in sched.log_text():
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)


def test_a_draining_node_gets_no_more_jobs_and_none_is_lost(
    tmp_path: Path, users: dict[str, Path]
) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    nodes = [start_node(tmp_path / f"node{i}", cpus=2, name=f"n{i}") for i in (0, 1)]
    sched = SchedulerProcess(tmp_path, [n.spec for n in nodes], nodes[0].secret)
    try:
        sched.start()
        with SharedJobCluster(
            hold, scheduler_host=sched.address, secret_file=str(users["alice"])
        ) as cluster:  # not reentrant: a job lost with a node would be Abandoned
            jobs = [cluster.submit(n, str(folder)) for n in range(10)]
            wait_until(lambda: len(list(folder.glob("started-*"))) == 4)
            nodes[0].proc.send_signal(signal.SIGTERM)  # the node alone: it drains
            wait_until(lambda: "draining" in nodes[0].log_text())
            # One of its jobs ends; the other holds it draining. A job sent to the
            # free CPU is handed back: it waits for the other node.
            first, _held = sorted(folder.glob("started-*-n0"))
            (folder / first.name.split("-")[1]).touch()
            handed_back(sched)
            (folder / "all").touch()
            results = [job() for job in jobs]
            failures = [str(job.exception) for job in jobs if job.exception]
            assert [job.status for job in jobs] == [JobStatus.Finished] * 10, failures
            assert results == list(range(10))
        assert nodes[0].proc.wait(30) == 0
        assert "shuts down: no more jobs for it" in sched.log_text()
    finally:
        sched.stop()
        for node in nodes:
            node.stop()
