"""A job that makes a process outside its worker: ``clone(CLONE_PARENT)``.

The new process's parent is the worker's parent (the computation process): it is
not the worker's descendant, so neither the job's end (the worker's subreaper)
nor, where there is no pids cgroup, max_pids's count of the worker's processes
sees it; after ``setsid`` it is not in the worker's group either. One system call,
through ``ctypes``, from any job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from dispynb import DispyJob, JobCluster, LocalCluster
from tests.hostile.tools import wait_for

pytestmark = pytest.mark.slow

CLONE_PARENT = 0x00008000
#: clone's system call number per machine (its first two arguments, flags and
#: stack, are the same on both).
CLONE_SYSCALL = {"x86_64": 56, "aarch64": 220}

#: Processes the sibling starts at most (max_pids is 32: over it).
FORKS = 40


def sibling_with_children(marker: str, forks: int, leave: bool) -> tuple[int, int]:
    """Make this worker a sibling (clone with CLONE_PARENT) that leaves the session
    and forks sleepers until refused or ``forks``, then exits at once with
    ``leave`` (orphaning them), else sleeps. The sibling writes to ``marker`` its
    parent and its pid, then each child's pid as it goes, then ``done``. Return
    (its parent, this worker's parent) once it is done, or killed."""
    import ctypes

    def note(text: str) -> None:
        with open(marker, "a") as handle:
            handle.write(f"{text}\n")

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    number = CLONE_SYSCALL[os.uname().machine]
    pid = libc.syscall(number, CLONE_PARENT | signal.SIGCHLD, 0, 0, 0, 0)
    if pid == 0:  # the sibling: never back into the worker's loop
        try:
            note(f"{os.getppid()} {os.getpid()}")
            os.setsid()
            with contextlib.suppress(OSError):  # refused at the cgroup's limit
                for _ in range(forks):
                    child = os.fork()
                    if child == 0:
                        time.sleep(60)
                        os._exit(0)
                    note(str(child))
            note("done")
            if not leave:
                time.sleep(60)
        finally:
            os._exit(0)
    assert pid > 0, f"clone failed: errno {ctypes.get_errno()}"
    deadline = time.monotonic() + 10
    lines: list[str] = []
    while time.monotonic() < deadline:
        gone = not os.path.exists(f"/proc/{pid}")  # killed, and reaped by its parent
        with contextlib.suppress(FileNotFoundError), open(marker) as handle:
            lines = handle.read().split("\n")[:-1]  # whole lines (all, once gone)
        if "done" in lines or gone:
            break
        time.sleep(0.01)
    if not lines:  # killed as a stray before its first line (the computation
        return 0, os.getppid()  # process looks at once after a child ended)
    return int(lines[0].split()[0]), os.getppid()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _escape(
    nodes: object, tmp_path: Path, leave: bool, secret: str | None = None
) -> str:
    """Run the job on ``nodes``; what was measured (asserting all ended while the
    cluster is still open)."""
    marker = str(tmp_path / "sibling")
    with JobCluster(
        sibling_with_children, nodes=nodes, secret=secret, max_pids=32
    ) as cluster:
        job = cluster.submit(marker, FORKS, leave)
        parent, computation = job()
        ended = time.monotonic()
        assert job.status == DispyJob.Finished, job.exception
        with open(marker) as handle:
            pids = [int(p) for p in handle.read().split()[1:] if p.isdigit()]
        assert parent == computation, "the sibling was made outside the worker"
        try:
            took = wait_for(
                lambda: not any(_alive(pid) for pid in pids),
                "the sibling and its children killed",
            )
        finally:
            for pid in pids:  # (before the fix: they would run for a minute)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        after = time.monotonic() - ended
        again = cluster.submit(str(tmp_path / "again"), 0, False)
        again()
        assert again.status == DispyJob.Finished, again.exception
    return f"{len(pids)} processes all ended {after:.1f} s after the job ({took:.1f} s)"


@pytest.mark.skipif(
    os.uname().machine not in CLONE_SYSCALL, reason="clone's number not known here"
)
@pytest.mark.attack(
    id="clone-parent-escape",
    title="A job makes its worker a sibling (clone with CLONE_PARENT, then setsid) "
    f"that forks {FORKS} sleepers under max_pids=32 and stays, or exits at once "
    "orphaning them; with and without pids cgroups",
    goal="the sibling and all it started killed while the cluster runs on (its "
    "computation process looks twice a second); was: all ran on after the job, "
    "uncounted by max_pids without a cgroup",
)
@pytest.mark.parametrize("leave", [False, True], ids=["stays", "leaves"])
@pytest.mark.parametrize("cgroups", [True, False], ids=["cgroups", "no-cgroup"])
def test_a_process_made_outside_the_worker_is_ended(
    cgroups: bool, leave: bool, tmp_path: Path, measure
) -> None:
    from tests.nodeproc import running_node

    if cgroups:
        with LocalCluster(cpus=1) as local:
            figure = _escape(local, tmp_path, leave)
    else:
        launcher = ["env", "DISPYNB_PIDS_CGROUP=off"]  # execs the node: same pid
        with running_node(tmp_path / "node", launcher=launcher) as node:
            figure = _escape([node.spec], tmp_path, leave, node.secret)
    how = "the sibling exits, orphaning them" if leave else "the sibling stays"
    measure(f"{'cgroups' if cgroups else 'no cgroup'}, {how}: {figure}")


@pytest.mark.skipif(
    os.uname().machine not in CLONE_SYSCALL, reason="clone's number not known here"
)
@pytest.mark.timeout(60)
def test_what_a_sibling_leaves_is_logged_as_its_not_as_setsid(tmp_path: Path) -> None:
    """The sibling (clone with CLONE_PARENT, then setsid) forks sleepers and exits:
    they come to the computation process in the sibling's process group, and its
    log says they outlived that process (was: "outside its worker's process group
    (setsid)", which they never called)."""
    from tests.nodeproc import running_node

    marker = str(tmp_path / "sibling")
    with running_node(tmp_path / "node", "--debug") as node:
        with JobCluster(
            sibling_with_children, nodes=[node.spec], secret=node.secret
        ) as cluster:
            job = cluster.submit(marker, 3, True)
            job()
            assert job.status == DispyJob.Finished, job.exception
            with open(marker) as handle:
                pids = [int(p) for p in handle.read().split()[1:] if p.isdigit()]
            sibling, sleepers = pids[0], pids[1:]
            try:
                wait_for(
                    lambda: all(f"process {p} " in node.log_text() for p in sleepers),
                    "the sleepers killed and logged",
                )
            finally:
                for pid in sleepers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        lines = [
            line
            for line in node.log_text().splitlines()
            if any(f"process {p} " in line for p in sleepers)
        ]
    assert len(sleepers) == 3 and len(lines) == 3, lines
    for line in lines:
        assert "setsid" not in line, line
        assert f"that outlived process {sibling}, which the job started" in line, line
