"""A node stopped with SIGTERM (``systemctl stop``, Ctrl-C, SLURM's signal to the
node alone) drains: it hands back each job sent to it after that, to run elsewhere.
The scheduler stops sending it jobs at the first one handed back; before, it sent
each straight back to the same node, until the node closed with some of them, which
ended ``Abandoned`` ('node ... was lost') though they never ran."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import SharedJobCluster
from dispynb.job import JobStatus
from tests.jobs import wait_until
from tests.nodeproc import CliNode, start_node
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


@contextlib.contextmanager
def two_nodes(tmp_path: Path) -> Iterator[tuple[list[CliNode], SchedulerProcess]]:
    """Nodes n0 and n1 of 2 CPUs each, owned by a started scheduler."""
    nodes = [start_node(tmp_path / f"node{i}", cpus=2, name=f"n{i}") for i in (0, 1)]
    sched = SchedulerProcess(tmp_path, [n.spec for n in nodes], nodes[0].secret)
    try:
        sched.start()
        yield nodes, sched
    finally:
        sched.stop()
        for node in nodes:
            node.stop()


def test_a_draining_node_gets_no_more_jobs_and_none_is_lost(
    tmp_path: Path, users: dict[str, Path]
) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    with two_nodes(tmp_path) as (nodes, sched):
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


def test_a_stopping_nodes_reentrant_jobs_run_elsewhere_at_once(
    tmp_path: Path, users: dict[str, Path]
) -> None:
    """The node says it shuts down (NodeStatus.leaving) as it starts its 30 s drain:
    the scheduler moves a reentrant computation's jobs running there to the other
    node at once, as a direct JobCluster does (before: they ran on there until the
    drain ended, 30 s, then ran again elsewhere). cluster_status hears each moved
    job Abandoned on the node it left, then Running again, as dispy's does (before:
    Running once only, the client not told it was requeued)."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    heard: list[tuple[int, JobStatus]] = []

    def status(what: object, node: object, job: object) -> None:
        if job is not None and what != JobStatus.Created:
            heard.append((job.id, JobStatus(what)))  # type: ignore[attr-defined]

    with two_nodes(tmp_path) as (nodes, sched):
        with SharedJobCluster(
            hold,
            scheduler_host=sched.address,
            secret_file=str(users["alice"]),
            reentrant=True,
            cluster_status=status,
        ) as cluster:
            jobs = [cluster.submit_job_id(n, n, str(folder)) for n in range(4)]
            wait_until(lambda: len(list(folder.glob("started-*"))) == 4)
            # A job's file exists before its node's start notice reaches the
            # scheduler: one the client never heard Running on n0 rightly hears no
            # Abandoned for it (the CI failure of 2026-12-07, job 2: Running,
            # Finished). Here every job has been heard started before n0 stops.
            wait_until(lambda: len({key for key, _ in heard}) == 4)
            moved = sorted(p.name.split("-")[1] for p in folder.glob("started-*-n0"))
            assert moved, "no job on n0"
            nodes[0].proc.send_signal(signal.SIGTERM)  # drains for 30 s
            for started in folder.glob("started-*-n1"):  # n1's CPUs free up
                (folder / started.name.split("-")[1]).touch()
            # Well within the drain: n0's jobs run on n1 now.
            wait_until(
                lambda: all((folder / f"started-{n}-n1").exists() for n in moved),
                timeout=15,
            )
            (folder / "all").touch()
            assert [job() for job in jobs] == list(range(4))
            assert [job.status for job in jobs] == [JobStatus.Finished] * 4
            wait_until(
                lambda: len([h for h in heard if h[1] is JobStatus.Finished]) == 4
            )
        for n in range(4):
            said = [what for key, what in heard if key == n]
            again = [JobStatus.Running, JobStatus.Abandoned] if str(n) in moved else []
            assert said == [*again, JobStatus.Running, JobStatus.Finished], (n, heard)
        log = sched.log_text()
        assert "node 'n0' is shutting down (SIGTERM)" in log, log


def test_a_job_that_ends_with_its_stopping_node_says_why(
    tmp_path: Path, users: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Not reentrant, the job running on a node stopped with SIGTERM ends with the
    node's drain: Abandoned, in the node's words (before: 'node ... was lost
    (connection closed)'). The client's log says why the node left in the node's
    words too (before: 'left: it left the scheduler')."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    node = start_node(tmp_path / "node", "--drain-timeout", "1", cpus=1, name="n0")
    sched = SchedulerProcess(tmp_path, [node.spec], node.secret)
    try:
        sched.start()
        with SharedJobCluster(
            hold, scheduler_host=sched.address, secret_file=str(users["alice"])
        ) as cluster:
            job = cluster.submit(0, str(folder))
            wait_until(lambda: any(folder.glob("started-*")))
            node.proc.send_signal(signal.SIGTERM)
            assert job() is None
            left = (
                f"node {node.spec} left: it stopped: node 'n0' is shutting down "
                "(SIGTERM)"
            )
            wait_until(lambda: "left: " in caplog.text)
            assert left in caplog.text, caplog.text
        assert job.status is JobStatus.Abandoned
        assert f"node {node.spec} stopped: node 'n0' is shutting down (SIGTERM)" in (
            job.exception or ""
        ), job.exception
    finally:
        sched.stop()
        node.stop()


def test_a_node_its_operator_stops_is_said_without_warnings(
    tmp_path: Path, users: dict[str, Path]
) -> None:
    """``systemctl stop`` of a node running reentrant jobs is no fault: the
    scheduler said it at warning level three times (the node 'is down', each
    computation's jobs 'lost', and 'cannot connect (trying again)'), which log
    watchers alert on. A node that vanishes without saying so still warns."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    with (
        two_nodes(tmp_path) as (nodes, sched),
        SharedJobCluster(
            hold,
            scheduler_host=sched.address,
            secret_file=str(users["alice"]),
            reentrant=True,
        ) as cluster,
    ):
        jobs = [cluster.submit(n, str(folder)) for n in range(4)]
        wait_until(lambda: len(list(folder.glob("started-*"))) == 4)
        nodes[0].proc.send_signal(signal.SIGTERM)
        (folder / "all").touch()
        assert [job() for job in jobs] == list(range(4))
        assert nodes[0].proc.wait(30) == 0
        stopped, vanished = nodes[0].spec, nodes[1].spec
        wait_until(lambda: retried(sched, stopped))
        nodes[1].proc.kill()  # vanishes: a fault
        wait_until(lambda: retried(sched, vanished))
    warnings = [line for line in sched.log_text().splitlines() if " WARNING " in line]
    assert not [line for line in warnings if stopped in line], warnings
    assert [line for line in warnings if f"node {vanished} is down" in line]
    assert f"node {stopped} stopped: node 'n0' is shutting down (SIGTERM)" in (
        sched.log_text()
    )


def retried(sched: SchedulerProcess, node: str) -> bool:
    """Whether the scheduler tried to reach ``node`` again after it went."""
    return any(
        f"node {node}: " in line and "trying again" in line
        for line in sched.log_text().splitlines()
    )
