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
import functools
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dispynb import DispyJob, JobCluster
from dispynb.reprs import status_name
from tests.jobs import WAIT, square, wait_until
from tests.nodeproc import CliNode, running_node

pytestmark = pytest.mark.slow

#: Seconds between pulses: a killed node is noticed within a few.
PULSE = 0.2
#: Run a node without pids cgroups (``env`` execs the node: its pid stays).
NO_CGROUPS = ["env", "DISPYNB_PIDS_CGROUP=off"]


# --- run on nodes -------------------------------------------------------------


def daemonize_and_hold(directory: str, hold_on: str, together: int = 0) -> str:
    """Double-fork a ``setsid()``'d sleeper, write its pid and the job's to
    ``directory``; on node ``hold_on`` hold for two minutes, else return once
    ``together`` jobs have written theirs (so that a fast node does not take the
    jobs meant to start on ``hold_on``)."""
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
    deadline = time.monotonic() + 60
    while sum(p.name.isdigit() for p in pathlib.Path(directory).iterdir()) < together:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {together} jobs started")
        time.sleep(0.01)
    return node


def daemonize_and_crash(directory: str) -> None:
    """Double-fork a ``setsid()``'d sleeper, write its pid, and end the worker
    abruptly (``os._exit``: as a segfault or the OOM killer would)."""
    import os
    import pathlib
    import time

    first = os.fork()
    if first == 0:
        os.setsid()
        daemon = os.fork()
        if daemon == 0:
            time.sleep(120)
            os._exit(0)
        pathlib.Path(directory, "daemon").write_text(str(daemon))
        os._exit(0)
    os.waitpid(first, 0)
    os._exit(3)


def daemonize_and_crash_when_told(directory: str) -> None:
    """Write ``ready``, wait for ``go`` in ``directory``, then
    `daemonize_and_crash`."""
    import pathlib
    import time

    pathlib.Path(directory, "ready").touch()
    deadline = time.monotonic() + 60
    while not pathlib.Path(directory, "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("never told to go")
        time.sleep(0.01)
    daemonize_and_crash(directory)


def start_a_sleeper(record: str) -> int:
    """A setup that starts a child (kept in the computation's globals) and writes
    the pids of its process and of that child."""
    import os
    import pathlib
    import subprocess

    _kept.append(subprocess.Popen(["sleep", "120"]))
    pathlib.Path(record).write_text(f"{os.getpid()} {_kept[-1].pid}")
    return 0


_kept: list[subprocess.Popen[bytes]] = []


# --- helpers --------------------------------------------------------------------


def _written(markers: Path) -> dict[int, str]:
    """The jobs' markers written so far (renamed into place): pid -> node name."""
    return {
        int(path.name): path.read_text()
        for path in markers.iterdir()
        if path.name.isdigit()
    }


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


def _zygote(node: CliNode) -> psutil.Process:
    """The node's zygote (its process maker)."""
    children = psutil.Process(node.proc.pid).children()
    return next(child for child in children if child.name() == "dispynb-zygote")


def _request_waiting(pid: int) -> bool:
    """Whether a socket of process ``pid`` holds a message it has not read (a
    request of its node, for a stopped zygote), as ``ss`` reports it."""
    listed = subprocess.run(
        ["ss", "-x", "-a", "-n", "-p"], capture_output=True, text=True, timeout=WAIT
    ).stdout
    for line in listed.splitlines():
        fields = line.split()  # Netid State Recv-Q ...
        if f"pid={pid}," in line and fields[2].isdigit() and int(fields[2]) > 0:
            return True
    return False


@contextlib.contextmanager
def _held_computation(
    node: CliNode, directory: Path, name: str = "a"
) -> Iterator[tuple[list[DispyJob], int, int, list[psutil.Process]]]:
    """A cluster on ``node`` (named ``name``) whose setup started a child and whose
    two jobs each left a ``setsid()`` daemon and hold: its jobs, its computation
    process's pid, the setup's child's pid, and every process below the latter."""
    markers, record = directory / "markers", directory / "record"
    markers.mkdir()
    setup = functools.partial(start_a_sleeper, str(record))
    with JobCluster(
        daemonize_and_hold, nodes=[node.spec], secret=node.secret, setup=setup
    ) as cluster:
        jobs = [cluster.submit(str(markers), name) for _ in range(2)]
        wait_until(lambda: len(_written(markers)) == 2)
        computation, child = (int(pid) for pid in record.read_text().split())
        below = psutil.Process(computation).children(recursive=True)
        yield jobs, computation, child, below


def _another_cluster(
    node: CliNode, ready: threading.Event, release: threading.Event
) -> None:
    """A second cluster on ``node``: ``ready`` once its computation process was
    made (or it failed), held open until ``release``."""
    try:
        with JobCluster(square, nodes=[node.spec], secret=node.secret) as other:
            assert other.submit(3)() == 9  # its process was made
            ready.set()
            release.wait(WAIT)
    finally:
        ready.set()


class _HeldLaunch:
    """Another cluster's computation process being made on a node whose zygote is
    stopped (`_launch_held`)."""

    def __init__(self, zygote: psutil.Process, ready: threading.Event) -> None:
        self._zygote = zygote
        self._ready = ready
        self._resumed = False

    def under_way(self) -> bool:
        """Whether the node's request to its zygote still waits, unread."""
        return _request_waiting(self._zygote.pid)

    def complete(self) -> None:
        """Let the zygote go on and wait until the other cluster's process is made
        (the cluster stays open until the block ends)."""
        self.resume()
        assert self._ready.wait(WAIT), "the other cluster's process was not made"

    def resume(self) -> None:
        if not self._resumed:
            self._resumed = True
            self._zygote.resume()


@contextlib.contextmanager
def _launch_held(node: CliNode) -> Iterator[_HeldLaunch]:
    """A launch under way on ``node`` for the block: its zygote stopped, another
    cluster waits for its computation process (seen waiting as the block begins).
    ``complete()`` lets it finish; the block's end closes that cluster."""
    ready, release = threading.Event(), threading.Event()
    zygote = _zygote(node)
    other = threading.Thread(
        target=_another_cluster, args=(node, ready, release), daemon=True
    )
    launch = _HeldLaunch(zygote, ready)
    zygote.suspend()
    try:
        other.start()
        wait_until(launch.under_way)
        yield launch
    finally:
        launch.resume()
        release.set()
        other.join(WAIT)


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
        # Node b's first job returns once both of node a's CPUs run one each.
        jobs = [cluster.submit(str(markers), "a", 3) for _ in range(4)]
        wait_until(lambda: list(_written(markers).values()).count("a") == 2)
        for pid, name in _written(markers).items():
            if name == "a":  # the job's worker adopted the sleeper
                assert len(psutil.Process(pid).children()) == 1
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
        wait_until(lambda: bool(_written(markers)))
        worker = psutil.Process(next(iter(_written(markers))))
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

    # Renamed into place: the test reads it as soon as it exists.
    pathlib.Path(f"{marker}.tmp").write_text(str(os.getpid()))
    os.replace(f"{marker}.tmp", marker)
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


@pytest.mark.attack(
    id="crashing-daemonizing-job",
    title="A job double-forks a setsid() daemon and ends its worker with os._exit "
    "(a segfault, the OOM killer alike; no pids cgroups)",
    goal="the daemon does not outlive the worker; the job ends saying how",
)
def test_a_crashed_workers_daemon_is_killed(tmp_path: Path, measure) -> None:
    with (
        running_node(tmp_path / "a", launcher=NO_CGROUPS) as a,
        JobCluster(daemonize_and_crash, nodes=[a.spec], secret=a.secret) as cluster,
    ):
        job = cluster.submit(str(tmp_path))
        job()
        daemon = int((tmp_path / "daemon").read_text())
        try:
            left = _left([psutil.Process(daemon)])
        except psutil.NoSuchProcess:  # killed and reaped already
            left = []
        measure(f"job {status_name(job.status)}; {len(left)} daemon left")
        assert job.status == DispyJob.Terminated
        assert "exited with status 3" in str(job.exception)
        assert left == []


@pytest.mark.attack(
    id="killed-computation",
    title="A computation process is killed (kill -9, as the OOM killer) while its "
    "setup's child and its jobs' setsid() daemons run (no pids cgroups; with the "
    "node's zygote, and without: DISPYNB_ZYGOTE=0)",
    goal="none of them left; its jobs end saying the process died; the node serves on",
)
@pytest.mark.parametrize("zygote", ["1", "0"], ids=["zygote", "no-zygote"])
def test_a_killed_computation_leaves_nothing(
    tmp_path: Path, measure, zygote: str
) -> None:
    launcher = [*NO_CGROUPS, f"DISPYNB_ZYGOTE={zygote}"]
    with running_node(tmp_path / "a", name="a", cpus=2, launcher=launcher) as a:
        with _held_computation(a, tmp_path) as (jobs, computation, child, below):
            psutil.Process(computation).kill()
            for job in jobs:
                job()
            left = _left(below)
            measure(
                f"zygote {'on' if zygote == '1' else 'off'}: {len(left)} processes "
                f"left; jobs {status_name(jobs[0].status)}"
            )
            assert left == []
            assert child in [process.pid for process in below]
            assert [job.status for job in jobs] == [DispyJob.Abandoned] * 2
            assert "the computation's process on the node died" in str(
                jobs[0].exception
            )
        with JobCluster(square, nodes=[a.spec], secret=a.secret) as other:
            assert other.submit(4)() == 16


@pytest.mark.attack(
    id="orphan-during-launch",
    title="A job's worker dies leaving a setsid() daemon while another cluster's "
    "computation process is being made (its zygote slow: stopped; no pids cgroups)",
    goal="the daemon is killed at once, the launch still under way: its computation "
    "process is the subreaper of what a job leaves (was: it went to the node, which "
    "could kill it only once the launch ended); the launch then completes",
)
def test_a_daemon_left_during_a_launch_is_killed_once_it_ends(
    tmp_path: Path, measure
) -> None:
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to see the zygote's pending request")
    with (
        running_node(tmp_path / "a", cpus=2, launcher=NO_CGROUPS) as a,
        JobCluster(
            daemonize_and_crash_when_told, nodes=[a.spec], secret=a.secret
        ) as cluster,
    ):
        job = cluster.submit(str(tmp_path))
        wait_until((tmp_path / "ready").exists)
        with _launch_held(a) as launch:
            (tmp_path / "go").touch()
            job()  # its worker died, its daemon went to the computation process
            ended = time.monotonic()
            try:  # gone already, or it ends while the launch is still held
                left = _left([psutil.Process(int((tmp_path / "daemon").read_text()))])
            except psutil.NoSuchProcess:
                left = []
            took = time.monotonic() - ended
            assert launch.under_way()  # throughout
            launch.complete()
    measure(
        f"job {status_name(job.status)}; daemon left: {len(left)}, {took:.2f} s after "
        "the job's end, the launch still held"
    )
    assert job.status == DispyJob.Terminated
    assert left == []


@pytest.mark.attack(
    id="killed-computation-during-launch",
    title="A computation process is killed (kill -9) while another cluster's "
    "computation process is being made (its zygote slow: stopped; no pids "
    "cgroups), leaving its setup's child and its jobs' setsid() daemons",
    goal="they come to the node, which puts their killing off while the launch is "
    "under way (the new process's pid is not known yet) and kills them as it "
    "ends; the launch completes",
)
def test_what_a_computation_killed_during_a_launch_leaves_is_killed_as_it_ends(
    tmp_path: Path, measure
) -> None:
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to see the zygote's pending request")
    with (
        running_node(tmp_path / "a", name="a", cpus=2, launcher=NO_CGROUPS) as a,
        _held_computation(a, tmp_path) as (jobs, computation, child, below),
        _launch_held(a) as launch,
    ):
        psutil.Process(computation).kill()
        for job in jobs:
            job()
        held = sum(process.is_running() for process in below)
        assert launch.under_way()  # still
        launch.complete()
        # Before that cluster closes: its process's end would sweep too.
        left = _left(below)
    measure(
        f"{len(below)} processes below the killed computation; {held} alive while "
        f"the launch was held; {len(left)} left after it"
    )
    assert child in [process.pid for process in below]
    assert [job.status for job in jobs] == [DispyJob.Abandoned] * 2
    assert left == []


def stop_parent_or_die(what: str) -> int:
    """ "stop": SIGSTOP this worker's parent, the computation process (its pid
    returned); "die": end this worker (status 3); else return 1."""
    import os
    import signal

    if what == "stop":
        os.kill(os.getppid(), signal.SIGSTOP)
        return os.getppid()
    if what == "die":
        os._exit(3)
    return 1


@pytest.mark.attack(
    id="stopped-computation",
    title="A job sends SIGSTOP to its computation process (its worker's parent); the "
    "next job's worker dies",
    goal="the dead worker's job reported within 2 s, the jobs after it run, the "
    "process continued (was: that job waited for ever, none after it ran, and the "
    "stopped process outlived its node)",
)
@pytest.mark.timeout(60)
def test_a_computation_process_a_job_stopped_is_continued(tmp_path: Path, measure):
    stopped = 0
    with running_node(tmp_path / "node") as node:
        try:
            with JobCluster(
                stop_parent_or_die, nodes=[node.spec], secret=node.secret
            ) as cluster:
                stopped = cluster.submit("stop")()
                assert stopped, "the job did not run"
                started = time.monotonic()
                died = cluster.submit("die")
                assert died.wait(10), "the dead worker's job is not reported"
                took = time.monotonic() - started
                assert cluster.submit("ok")() == 1
                state = psutil.Process(stopped).status()
        finally:
            if stopped:  # (before the fix: left stopped after its node)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stopped, signal.SIGCONT)
        log = node.log_text()
    measure(f"the dead worker's job reported in {took:.1f} s; the process {state}")
    assert died.status == DispyJob.Terminated and "status 3" in died.exception
    assert took < 2 and state != psutil.STATUS_STOPPED
    assert log.count("its process was stopped (SIGSTOP, from a job?)") == 1
