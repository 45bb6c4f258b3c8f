"""Jobs cannot leave processes behind (issue 13 item 5), on real node processes.

A job's worker leads its own process group and is the subreaper of what it starts;
where the node can create a pids cgroup, each worker has one with ``pids.max``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from dispynb import DispyJob, JobCluster, LocalCluster
from tests.jobs import WAIT, wait_until

pytestmark = pytest.mark.slow


# --- run on nodes -------------------------------------------------------------


def fork_sleepers(count: int, detach: bool) -> list[int]:
    """Fork ``count`` children that sleep for a minute; return their pids."""
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            if detach:  # leave the worker's process group and session
                os.setsid()
            time.sleep(60)
            os._exit(0)
        pids.append(pid)
    return pids


def fork_and_spin(marker: str) -> None:
    """Fork a child; both ignore SIGINT and spin (only SIGKILL stops them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pid = os.fork()
    if pid == 0:
        while True:
            pass
    with open(f"{marker}.tmp", "w") as handle:
        handle.write(str(pid))
    os.replace(f"{marker}.tmp", marker)
    while True:
        pass


def fork_until_refused(limit: int) -> tuple[int, str]:
    """Fork sleeping children until refused (or ``limit``); how many, and why."""
    count, error = 0, ""
    try:
        for _ in range(limit):
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            count += 1
    except OSError as exc:
        error = type(exc).__name__
    return count, error


def sleep_with_detached_children(marker: str, count: int) -> None:
    pids = fork_sleepers(count, detach=True)
    with open(f"{marker}.tmp", "w") as handle:
        handle.write(" ".join(map(str, pids)))
    os.replace(f"{marker}.tmp", marker)
    time.sleep(60)


# --- helpers --------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _all_gone(pids: list[int]) -> bool:
    return not any(_alive(pid) for pid in pids)


def _read_pids(path: str) -> list[int]:
    wait_until(lambda: os.path.exists(path), WAIT)
    with open(path) as handle:
        return [int(p) for p in handle.read().split()]


@pytest.fixture(scope="module")
def local():
    with LocalCluster(cpus=2) as cluster:
        yield cluster


# --- tests ----------------------------------------------------------------------


@pytest.mark.attack(
    id="forked-children",
    title="A job forks 200 sleeping children (in its group, or after setsid)",
    goal="none outlives the job",
)
@pytest.mark.parametrize("detach", [False, True], ids=["same-group", "setsid"])
def test_children_of_a_finished_job_end_with_it(local, detach, measure):
    with JobCluster(fork_sleepers, nodes=local) as cluster:
        job = cluster.submit(200, detach)
        pids = job()
        assert job.status == DispyJob.Finished, job.exception
        assert len(pids) == 200
        # Killed and reaped before the job's result was sent.
        alive = sum(_alive(pid) for pid in pids)
        measure(f"{'setsid' if detach else 'same group'}: {alive} of 200 alive")
        assert alive == 0
        assert cluster.submit(0, False)() == []  # the worker is fine


@pytest.mark.attack(
    id="fork-ignore-sigint",
    title="A job forks, ignores SIGINT and spins (both) under dispy_job_timeout=1",
    goal="Terminated within 6 s (was 25 s), its child killed",
)
def test_job_forking_and_ignoring_sigint_ends_at_its_timeout(local, tmp_path, measure):
    marker = str(tmp_path / "child")
    with JobCluster(fork_and_spin, nodes=local) as cluster:
        started = time.monotonic()
        job = cluster.submit(marker, dispy_job_timeout=1)
        child = _read_pids(marker)[0]
        job()
        took = time.monotonic() - started
        measure(f"ended {job.status.name} after {took:.1f} s")
        assert job.status == DispyJob.Terminated
        assert "time limit" in job.exception
        # 1 s, then KeyboardInterrupt (ignored), then SIGKILL of the group after 2 s.
        assert took < 6, took
        wait_until(lambda: not _alive(child), WAIT)


@pytest.mark.attack(
    id="children-at-close",
    title="A running job's 20 setsid children when its cluster closes",
    goal="all killed (through the worker's pids cgroup)",
)
def test_cluster_close_kills_a_running_jobs_detached_children(local, tmp_path, measure):
    marker = str(tmp_path / "children")
    cluster = JobCluster(sleep_with_detached_children, nodes=local)
    try:
        cluster.submit(marker, 20)
        pids = _read_pids(marker)
        assert len(pids) == 20
    finally:
        cluster.close(terminate=True)
    # setsid children left the group: the cgroup (or nothing) gets them.
    if not _cgroups_available():
        pytest.skip("no pids cgroup here: setsid children escape the process group")
    wait_until(lambda: _all_gone(pids), WAIT)
    measure("0 of 20 alive after close")


@pytest.mark.attack(
    id="fork-bomb",
    title="A job forks until refused, under max_pids=32",
    goal="fork fails (BlockingIOError) below the limit; node unharmed",
)
def test_a_fork_bomb_stops_at_max_pids(local, measure):
    if not _cgroups_available():
        pytest.skip("no pids cgroup can be created here")
    with JobCluster(fork_until_refused, nodes=local, max_pids=32) as cluster:
        job = cluster.submit(5000)
        count, error = job()
        measure(f"{count} forks, then {error or 'no error'}")
        assert job.status == DispyJob.Finished, job.exception
        assert error == "BlockingIOError"
        assert count < 32


def _cgroups_available() -> bool:
    from nodeserver.containment import find_pids_root

    return find_pids_root() is not None


@pytest.mark.attack(
    id="fork-bomb-no-cgroup",
    title="A job forks until refused, under max_pids=32, on a node without pids "
    "cgroups",
    goal="the job is killed with all its processes, its error naming max_pids",
)
def test_a_fork_bomb_without_cgroups_is_counted_and_killed(tmp_path, measure):
    from tests.nodeproc import running_node

    launcher = ["env", "DISPYNB_PIDS_CGROUP=off"]  # execs the node: same pid
    with running_node(tmp_path / "node", launcher=launcher) as node:
        with JobCluster(
            fork_sleepers_slowly,
            nodes=[node.spec],
            secret=node.secret,
            max_pids=32,
        ) as cluster:
            job = cluster.submit(str(tmp_path / "pids"), 200)
            job()
        pids = _read_pids(str(tmp_path / "pids"))
        measure(f"{job.status.name} after {len(pids)} forks: {job.exception[:70]}")
        assert job.status == DispyJob.Terminated
        assert "max_pids of 32" in job.exception
        wait_until(lambda: _all_gone(pids), WAIT)


def fork_sleepers_slowly(marker: str, count: int) -> None:
    """Fork sleeping children one every 10 ms, recording their pids as it goes."""
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        with open(marker, "a") as handle:
            handle.write(f"{pid}\n")
        time.sleep(0.01)


def test_cancel_kills_a_jobs_forked_child_that_ignores_sigint(local, tmp_path):
    marker = str(tmp_path / "child")
    with JobCluster(fork_and_spin, nodes=local) as cluster:
        job = cluster.submit(marker)
        child = _read_pids(marker)[0]
        cluster.cancel(job)
        job()
        assert job.status == DispyJob.Terminated
        wait_until(lambda: not _alive(child), WAIT)


# --- where each process's pids cgroup is -----------------------------------------


def pids_cgroup(pid: int) -> str:
    """The pids cgroup of ``pid`` (cgroup v1's pids hierarchy, else v2's)."""
    with open(f"/proc/{pid}/cgroup") as handle:
        lines = [line.rstrip("\n").split(":", 2) for line in handle]
    for _, controllers, path in lines:
        if "pids" in controllers.split(","):
            return path
    return next(path for hierarchy, _, path in lines if hierarchy == "0")


def job_cgroup() -> tuple[str, int]:
    """The job's pids cgroup and the computation process's pid."""
    return pids_cgroup(os.getpid()), os.getppid()


def _pids_max(cgroup: str) -> int:
    from nodeserver.containment import node_pids_root

    root = node_pids_root()
    assert root is not None
    with open(os.path.join(root, os.path.basename(cgroup), "pids.max")) as handle:
        return int(handle.read())


def _same_cgroup_as_its_node(computation: int) -> bool:
    return pids_cgroup(computation) == pids_cgroup(psutil.Process(computation).ppid())


def test_every_worker_starts_in_a_pids_cgroup_of_its_own(local):
    # The first worker is forked inside the cgroup the node server moved the
    # computation process into while it started (no cgroup move on the way to the
    # first job); the computation process then leaves it to the worker.
    if not _cgroups_available():
        pytest.skip("no pids cgroup can be created here")
    with JobCluster(job_cgroup, nodes=local, max_pids=32) as cluster:
        results = [job() for job in [cluster.submit() for _ in range(4)]]
        computation = results[0][1]
        wait_until(lambda: _same_cgroup_as_its_node(computation), WAIT)
        for path, parent in results:
            assert parent == computation
            assert os.path.basename(path).startswith(f"dispynb-{computation}-")
            assert pids_cgroup(computation) != path
            assert _pids_max(path) == 32  # the computation process no longer counts


SETUP_CHILD: list[subprocess.Popen[bytes]] = []


def start_a_sleeper() -> int:
    SETUP_CHILD.append(subprocess.Popen(["sleep", "60"]))
    return 0


def stop_the_sleeper() -> None:
    for child in SETUP_CHILD:
        child.kill()
        child.wait()


def setup_child_cgroup() -> tuple[str, str, int]:
    """The pids cgroups of the job and of setup's child; the computation's pid."""
    return pids_cgroup(os.getpid()), pids_cgroup(SETUP_CHILD[0].pid), os.getppid()


def test_what_setup_starts_is_in_no_workers_cgroup(local):
    if not _cgroups_available():
        pytest.skip("no pids cgroup can be created here")
    with JobCluster(
        setup_child_cgroup,
        nodes=local,
        setup=start_a_sleeper,
        cleanup=stop_the_sleeper,
        max_pids=32,
    ) as cluster:
        jobs = [cluster.submit() for _ in range(2)]
        for job in jobs:
            mine, setups, computation = job()
            assert job.status == DispyJob.Finished, job.exception
            node = psutil.Process(computation).ppid()
            # Setup ran, and its child stays, where the node server is: under no
            # worker's limit, and not killed with one.
            assert setups == pids_cgroup(node) == pids_cgroup(computation)
            assert mine != setups
