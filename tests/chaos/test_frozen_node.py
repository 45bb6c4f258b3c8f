"""A node frozen whole (SIGSTOP of the node server and all its processes, as a
batch system's freezer does), declared dead by its client, then thawed.

Its client ends the jobs it held ``Abandoned`` (not reentrant) and, the node back,
sets its computation up there again. The jobs the frozen node still held are for
nobody then: the one running must be stopped and the one queued behind it must
never start (a job reported Abandoned, then run, could run twice if resubmitted).
A real node from the command line; the client in this process, or a script
(killed, when its recovery file is tested).
"""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dispynb import DispyJob, JobCluster, recover_jobs
from dispynb.journal import Journal
from nodeserver.workerlife import SHUTDOWN_GRACE
from tests.chaos.outcomes import hold_two, wait_stopped
from tests.jobs import WAIT, wait_until
from tests.nodeproc import CliNode, node_env, running_node

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


def _write_pid(path: str) -> int:
    """Setup: write the computation process's pid to ``path``."""
    import os

    with open(path + ".tmp", "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    return 0


def _hang() -> None:
    """Cleanup that never ends by itself (a stuck network share, a lock)."""
    import time

    time.sleep(120)


@pytest.mark.timeout(90)
def test_an_adopted_computation_shutting_down_as_its_client_is_back_is_ended(
    tmp_path: Path,
) -> None:
    """A thawed node adopts its idle computation (its client gave it up) and shuts
    it down: its cleanup runs. The client, back, sets the computation up again
    meanwhile: the shutdown was cancelled half way and the close that followed
    did nothing (closing already), so the old process (its cleanup hung) ran on
    for ever, never killed nor reaped; now it is killed `SHUTDOWN_GRACE` s after
    its shutdown began, as any computation's."""
    pid_file = tmp_path / "setup-pid"
    with (
        running_node(tmp_path / "node", cpus=1) as node,
        JobCluster(
            abs,
            nodes=[node.spec],
            secret=node.secret,
            pulse_interval=0.3,
            recover_file=str(tmp_path / "journal"),
            setup=functools.partial(_write_pid, str(pid_file)),
            cleanup=_hang,
        ) as cluster,
    ):
        assert cluster.submit(-2)() == 2
        old = int(pid_file.read_text())
        pid_file.unlink()
        signal_tree(node, signal.SIGSTOP)
        try:
            wait_until(lambda: not cluster.status().nodes, timeout=30)
        finally:
            signal_tree(node, signal.SIGCONT)
        # Back: set up again (a new process), while the old one shuts down.
        assert cluster.submit(-3)() == 3
        assert int(pid_file.read_text()) != old
        try:
            wait_stopped(old, timeout=SHUTDOWN_GRACE + 15)
        except AssertionError:
            raise AssertionError(
                f"the old computation process runs on:\n{node.log_text()}"
            ) from None
        cluster.close(terminate=True)  # its own cleanup hangs too: killed
    log = node.log_text()
    assert "did not stop; killing it" in log, log


ABANDONING_CLIENT = """
import sys, time
import dispynb as dispy

def compute(n, marks, release):
    import os, time
    open(os.path.join(marks, str(n)), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return n * n

cluster = dispy.JobCluster(
    compute, nodes=[sys.argv[1]], secret=sys.argv[2], recover_file=sys.argv[3],
    pulse_interval=0.3,
)
job = cluster.submit(3, sys.argv[4], sys.argv[5])
job.id = "three"
job()
print(int(job.status), flush=True)
time.sleep(60)  # killed before it gets further
"""


@pytest.mark.timeout(90)
def test_recover_jobs_returns_the_result_of_a_job_abandoned_with_a_frozen_node(
    tmp_path: Path,
) -> None:
    """The client gives the job up with its frozen node (Abandoned, journaled so)
    and is killed before the node is back; the node, thawed, runs the job on and
    keeps its result for an hour. `recover_jobs` returns that result (and journals
    it): before, it returned the job Abandoned without asking the node."""
    journal, marks, release = tmp_path / "journal", tmp_path / "marks", tmp_path / "go"
    marks.mkdir()
    (tmp_path / "client.py").write_text(ABANDONING_CLIENT)
    with running_node(tmp_path / "node", cpus=1) as node:
        client = subprocess.Popen(
            [
                sys.executable,
                "client.py",
                node.spec,
                node.secret,
                str(journal),
                str(marks),
                str(release),
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert client.stdout is not None
            wait_until(lambda: (marks / "3").exists(), timeout=30)
            signal_tree(node, signal.SIGSTOP)
            try:
                assert client.stdout.readline() == f"{int(DispyJob.Abandoned)}\n"
                client.kill()
                client.wait(WAIT)
            finally:
                signal_tree(node, signal.SIGCONT)
            release.touch()
            [job] = recover_jobs(str(journal), timeout=30, secret=node.secret)
            assert (job.id, job.status, job.result) == ("three", DispyJob.Finished, 9)
            assert job.ip_addr == "127.0.0.1"
            # Journaled: the node gave its kept result away, the file has it.
            [again] = recover_jobs(str(journal), timeout=30, secret=node.secret)
            assert (again.id, again.status, again.result) == (job.id, job.status, 9)
        finally:
            release.touch()
            client.kill()
            client.communicate()


HOLDING_CLIENT = """
import sys, time
import dispynb as dispy
from tests.chaos.test_frozen_node import mark_and_hold

cluster = dispy.JobCluster(
    mark_and_hold, nodes=[sys.argv[1]], secret=sys.argv[2], recover_file=sys.argv[3]
)
cluster.submit(0, sys.argv[4], sys.argv[5]).id = "held"
time.sleep(60)  # killed before it gets further
"""


@pytest.mark.timeout(90)
def test_a_job_given_up_that_its_node_never_had_stays_abandoned(
    tmp_path: Path,
) -> None:
    """The journal records a job Abandoned with a node that never had it (lost on
    the way as the node froze); the node still runs another job of the crashed
    client when `recover_jobs`' timeout passes: that one is Running, the other
    keeps the journal's Abandoned and its reason (it was returned Running too)."""
    journal, marks, release = tmp_path / "journal", tmp_path / "marks", tmp_path / "go"
    marks.mkdir()
    (tmp_path / "client.py").write_text(HOLDING_CLIENT)
    with running_node(tmp_path / "node", cpus=1) as node:
        args = [node.spec, node.secret, str(journal), str(marks), str(release)]
        client = subprocess.Popen(
            [sys.executable, "client.py", *args], cwd=tmp_path, env=node_env()
        )
        try:
            wait_until(lambda: (marks / "0").exists(), timeout=30)
            client.kill()
            client.wait(WAIT)
            wait_until(lambda: "client of computation" in node.log_text())
            recorded = Journal(str(journal))
            [(recovery_id, _name, _nodes)] = recorded.computations()
            ghost = DispyJob("ghost", (1, str(marks), str(release)), {})
            recorded.submitted(recovery_id, 999, ghost)
            recorded.sent(recovery_id, [999], node.spec)
            ghost._complete(DispyJob.Abandoned, exception="node was lost (no pulse)")
            recorded.done(recovery_id, 999, ghost)
            recorded.close()
            held, lost = recover_jobs(str(journal), timeout=2, secret=node.secret)
        finally:
            release.touch()
            client.kill()
            client.wait(WAIT)
    assert (held.id, held.status) == ("held", DispyJob.Running)
    assert (lost.id, lost.status) == ("ghost", DispyJob.Abandoned)
    assert lost.exception == "node was lost (no pulse)"
