"""A node's processes ended the way real tools end them, on real node processes.

systemd stops a unit with SIGTERM to every process, then SIGKILL; a batch system
kills a job's cgroup (every process at once); an operator stops a worker with
``kill -STOP``; a job double-forks and ``setsid()``s a daemon. After each, no
process of the node may remain, the client gets a clear answer, and reentrant jobs
run on another node. Nodes run without pids cgroups where that matters (as for a
user without a delegated cgroup tree): then only the process tree finds what a job
started.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from dispynb import DispyJob, JobCluster
from dispynb.reprs import status_name
from tests.jobs import WAIT, wait_until
from tests.nodeproc import CliNode, running_node

pytestmark = pytest.mark.slow

#: Seconds between pulses: a killed node is noticed within a few.
PULSE = 0.2
#: Run a node without pids cgroups (``env`` execs the node: its pid stays).
NO_CGROUPS = ["env", "DISPYNB_PIDS_CGROUP=off"]


# --- run on nodes -------------------------------------------------------------


def daemonize_and_hold(directory: str, hold_on: str) -> str:
    """Double-fork a ``setsid()``'d sleeper, write its pid and the job's to
    ``directory``; on node ``hold_on`` hold for two minutes, else return."""
    import os
    import pathlib
    import time

    first = os.fork()
    if first == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(120)
            os._exit(0)
        os._exit(0)
    os.waitpid(first, 0)
    node = dispy_node_name  # type: ignore[name-defined]  # noqa: F821
    pathlib.Path(directory, f"{os.getpid()}.tmp").write_text(node)
    os.replace(
        pathlib.Path(directory, f"{os.getpid()}.tmp"),
        pathlib.Path(directory, str(os.getpid())),
    )
    if node == hold_on:
        time.sleep(120)
    return node


# --- helpers --------------------------------------------------------------------


def _tree(node: CliNode) -> list[psutil.Process]:
    """The node and every process below it, as found now."""
    root = psutil.Process(node.proc.pid)
    return [root, *root.children(recursive=True)]


def _left(processes: list[psutil.Process]) -> list[str]:
    """Those of ``processes`` still running `WAIT` seconds on (zombies are not)."""
    _gone, alive = psutil.wait_procs(processes, timeout=WAIT)
    left = []
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid} {process.name()}")
    return left


def _signal_all(processes: list[psutil.Process], signum: int) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)


def _run_held_jobs(
    tmp_path: Path, stop_node_a: str
) -> tuple[list[str], list[DispyJob]]:
    """Two nodes, reentrant jobs that daemonize a sleeper each; the jobs on node
    a hold until node a is ended ``stop_node_a`` way. What was left of node a's
    processes, and the jobs."""
    markers = tmp_path / "markers"
    markers.mkdir()
    with (
        running_node(
            tmp_path / "a",
            "--drain-timeout",
            "1",
            name="a",
            cpus=2,
            launcher=NO_CGROUPS,
        ) as a,
        running_node(tmp_path / "b", name="b", secret=a.secret) as b,
        JobCluster(
            daemonize_and_hold,
            nodes=[a.spec, b.spec],
            secret=a.secret,
            reentrant=True,
            pulse_interval=PULSE,
        ) as cluster,
    ):
        wait_until(lambda: len(cluster.status().nodes) == 2)
        jobs = [cluster.submit(str(markers), "a") for _ in range(4)]
        wait_until(lambda: [p.read_text() for p in markers.iterdir()].count("a") == 2)
        for marker in markers.iterdir():
            if marker.read_text() == "a":  # the job's worker adopted the sleeper
                assert len(psutil.Process(int(marker.name)).children()) == 1
        tree = _tree(a)  # the sleepers included
        if stop_node_a == "systemd":
            # systemd's stop: SIGTERM to every process of the unit, SIGKILL to what
            # is left after TimeoutStopSec (short here).
            _signal_all(tree, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                a.proc.wait(2)
            _signal_all(tree, signal.SIGKILL)
        elif stop_node_a == "cgroup":
            _signal_all(tree, signal.SIGKILL)  # every process at once
        elif stop_node_a == "SIGTERM":  # to the node alone (KillMode=process)
            a.proc.send_signal(signal.SIGTERM)
        else:
            a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(WAIT)
        left = _left(tree)
        assert cluster.wait(timeout=30)
    return left, jobs


# --- tests ----------------------------------------------------------------------


@pytest.mark.attack(
    id="node-end-daemonizing-jobs",
    title="A node (no pids cgroups) whose jobs double-forked a setsid() daemon each "
    "is ended: kill -9; SIGTERM to it alone; systemd's stop (SIGTERM to every "
    "process, SIGKILL 2 s on); a batch system's cgroup kill (SIGKILL to all at once)",
    goal="no process of the node left; reentrant jobs finish on another node",
)
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "systemd", "cgroup"])
def test_an_ended_nodes_jobs_leave_no_daemon(tmp_path: Path, measure, how) -> None:
    left, jobs = _run_held_jobs(tmp_path, how)
    measure(f"{how}: {len(left)} processes left")
    assert left == []
    assert [job.status for job in jobs] == [DispyJob.Finished] * 4
    assert [job.result for job in jobs] == ["b"] * 4


@pytest.mark.attack(
    id="timeout-daemonizing-job",
    title="A job double-forks a setsid() daemon and runs over dispy_job_timeout "
    "(no pids cgroups)",
    goal="the daemon ends with the job",
)
def test_a_timed_out_jobs_daemon_ends_with_it(tmp_path: Path, measure) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    with (
        running_node(tmp_path / "a", name="a", launcher=NO_CGROUPS) as a,
        JobCluster(daemonize_and_hold, nodes=[a.spec], secret=a.secret) as cluster,
    ):
        job = cluster.submit(str(markers), "a", dispy_job_timeout=2)
        wait_until(lambda: any(p.suffix == "" for p in markers.iterdir()))
        worker = psutil.Process(int(next(markers.glob("[0-9]*")).name))
        sleeper = worker.children()[0]
        job()
        left = _left([worker, sleeper])
        measure(f"job {status_name(job.status)}; {len(left)} of its processes left")
        assert job.status == DispyJob.Terminated
        assert left == []


def _hold(marker: str) -> None:
    import os
    import pathlib
    import time

    pathlib.Path(marker).write_text(str(os.getpid()))
    time.sleep(120)


@pytest.mark.attack(
    id="stopped-worker",
    title="kill -STOP of a worker under a job: the job cancelled; again, and the "
    "node stopped (SIGTERM, --drain-timeout 1)",
    goal="cancelled promptly; the node stops, the job ends saying why, nothing left",
)
def test_a_stopped_worker_is_cancelled_and_leaves_nothing(
    tmp_path: Path, measure
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    with running_node(tmp_path / "a", "--drain-timeout", "1", name="a") as a:
        with JobCluster(_hold, nodes=[a.spec], secret=a.secret) as cluster:
            job = cluster.submit(str(first))
            wait_until(first.exists)
            worker = psutil.Process(int(first.read_text()))
            worker.suspend()
            started = time.monotonic()
            cluster.cancel(job)
            job()
            cancelled = time.monotonic() - started
            assert job.status == DispyJob.Terminated  # cancelled while running
            assert _left([worker]) == []
            held = cluster.submit(str(second))
            wait_until(second.exists)
            psutil.Process(int(second.read_text())).suspend()
            tree = _tree(a)
            started = time.monotonic()
            code = a.stop()
            stopped = time.monotonic() - started
            held()
            measure(
                f"cancelled in {cancelled:.1f} s; node stopped in {stopped:.1f} s, "
                f"exit {code}; the held job {status_name(held.status)}"
            )
            assert code == 0
            assert held.status == DispyJob.Abandoned, held.exception
            assert "node" in str(held.exception)
        assert _left(tree) == []
