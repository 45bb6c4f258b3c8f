"""A node that serves clients for weeks: what each client leaves on it must go.

Soak tests: a real ``python -m nodeserver`` serves many clients in turn (clusters
of this process closed normally, clients killed with SIGKILL while their jobs run,
setups that fail), and what the node holds afterwards (its directories, the
results it keeps, its descriptors) is back to what it held before, within a
bounded wait: nothing grows with the number of clients served.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from dispynb import JobCluster
from dispynb.backends import nodes as node_backend
from dispynb.errors import SetupError
from tests.jobs import WAIT, mark_and_sleep, square, wait_for_path
from tests.nodeproc import CliNode, node_env, running_node

pytestmark = pytest.mark.slow

_T = TypeVar("_T")

#: A client killed while its jobs run: ``SPEC SECRET MARKER``; its 2 jobs sleep
#: 0.5 s, the first writes MARKER when it starts.
KILLED_CLIENT = """
import sys, time
from dispynb import JobCluster

def job(marker, seconds):
    import os, time
    if marker:
        open(marker, "w").close()
    time.sleep(seconds)
    return os.getpid()

spec, secret, marker = sys.argv[1:4]
cluster = JobCluster(job, nodes=[spec], secret=secret)
cluster.submit(marker, 0.5)
cluster.submit("", 0.5)
time.sleep(60)  # killed here
"""


def _failing_setup() -> int:
    raise RuntimeError("this setup fails")


def _dest(node: CliNode) -> Path:
    return node.log.parent / "dest"


def _session_dirs(node: CliNode) -> list[str]:
    """What the node's sessions made in its dest_path (its own entries start with
    a dot: the lock, the file store, the kept results)."""
    return sorted(p.name for p in _dest(node).iterdir() if not p.name.startswith("."))


def _kept(node: CliNode) -> list[str]:
    """The computations whose results the node keeps (a directory each; the spool's
    own entries start with a dot: the mark of its node's port)."""
    return sorted(
        p.name for p in (_dest(node) / ".kept").iterdir() if not p.name.startswith(".")
    )


def _settled(probe: Callable[[], list[_T]], timeout: float) -> list[_T]:
    """What ``probe`` lists once it lists nothing, or still lists after ``timeout``
    seconds (for the assertion's message)."""
    deadline = time.monotonic() + timeout
    while (left := probe()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _kill_a_client_once_marked(
    script: str, args: list[str], marker: Path, cwd: Path
) -> None:
    """Run client ``script`` (``python -c``) with ``args`` then ``marker``; SIGKILL
    its process group once it creates ``marker`` (its jobs are running)."""
    with subprocess.Popen(
        [sys.executable, "-c", script, *args, str(marker)],
        cwd=cwd,  # its recovery journal goes there
        env=node_env(),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    ) as client:
        try:
            wait_for_path(marker, timeout=30)
        finally:
            os.killpg(client.pid, signal.SIGKILL)


def _kill_a_client_while_its_jobs_run(node: CliNode, tmp_path: Path, n: int) -> None:
    args = [node.spec, node.secret]
    _kill_a_client_once_marked(KILLED_CLIENT, args, tmp_path / f"started-{n}", tmp_path)


@pytest.mark.timeout(120)
def test_sessions_leave_no_directory_in_the_nodes_dest_path(tmp_path: Path) -> None:
    """30 clusters closed and 3 clients killed while their jobs ran: once those
    jobs ended, the node's dest_path holds no directory of any of them (before:
    one empty ``<client>-<pid>-<session>`` directory per session, for as long as
    the node ran); a killed client's results stay kept for its recover_jobs."""
    with running_node(tmp_path / "node", cpus=2) as node:
        for n in range(30):
            with JobCluster(square, nodes=[node.spec], secret=node.secret) as cluster:
                assert cluster.submit(n)() == n * n
        for n in range(3):
            _kill_a_client_while_its_jobs_run(node, tmp_path, n)
        # Their jobs end (the node lets them finish), then their computations close.
        assert _settled(lambda: _session_dirs(node), 30) == []
        assert len(_kept(node)) == 3  # kept an hour for recover_jobs, as designed


@pytest.mark.timeout(90)
def test_failed_setups_leave_no_kept_results(tmp_path: Path) -> None:
    """20 clusters whose setup raises: the node keeps nothing of them (before:
    each left its kept-results directory and its computation in the node's
    memory for as long as the node ran, never expiring)."""
    with running_node(tmp_path / "node", cpus=2) as node:
        for _ in range(20):
            with pytest.raises(SetupError, match="this setup fails"):
                JobCluster(
                    square,
                    nodes=[node.spec],
                    secret=node.secret,
                    setup=_failing_setup,
                )
        assert _kept(node) == []
        assert _session_dirs(node) == []


def _computation_processes(node: CliNode) -> list[psutil.Process]:
    tree = psutil.Process(node.proc.pid).children(recursive=True)
    return [p for p in tree if _name(p) == "dispynb-compute"]


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


@pytest.mark.timeout(90)
def test_results_of_a_computation_that_died_expire(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A computation whose process dies (the OOM killer, kill -9) while its client
    is connected: once its client leaves, what the node recorded for it expires
    as a gone client's results do (here after 1 s; before: never)."""
    monkeypatch.setattr(node_backend, "RECOVERY_KEEP", 1.0)
    with running_node(tmp_path / "node", cpus=2) as node:
        for n in range(3):
            marker = tmp_path / f"started-{n}"
            with JobCluster(
                mark_and_sleep, nodes=[node.spec], secret=node.secret
            ) as cluster:
                job = cluster.submit(str(marker), 30)
                wait_for_path(marker, timeout=WAIT)
                assert _kept(node)  # its results are kept from its setup on
                for process in _computation_processes(node):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()  # (its workers die with it)
                job()  # it ends with its computation
        assert _settled(lambda: _kept(node), WAIT) == []
        assert _settled(lambda: _session_dirs(node), WAIT) == []


def _interrupt_pages(node: CliNode) -> list[str]:
    """The node's descriptors of its workers' interrupt pages (memfds)."""
    return _descriptors(node, "dispynb-interrupt")


def _descriptors(node: CliNode, memfd: str) -> list[str]:
    """The node's descriptors of memfds named ``memfd``."""
    found = []
    for fd in Path(f"/proc/{node.proc.pid}/fd").iterdir():
        try:
            if memfd in os.readlink(fd):
                found.append(fd.name)
        except FileNotFoundError:
            continue  # closed meanwhile
    return found


@pytest.mark.timeout(90)
def test_closed_computations_leave_no_descriptor_open_on_the_node(
    tmp_path: Path,
) -> None:
    """10 clusters of 4 workers, each closed: after each, the node holds none of
    its workers' interrupt pages (before: their memfds stayed open, mapped, until
    a garbage collection happened to find the lost workers, 4 more per cluster
    meanwhile, counted against the node's descriptor limit as it admits
    computations) and no more descriptors than after the first."""
    with running_node(tmp_path / "node", cpus=4) as node:
        baseline = 0
        for n in range(10):
            with JobCluster(square, nodes=[node.spec], secret=node.secret) as cluster:
                jobs = [cluster.submit(i) for i in range(8)]
                assert [job() for job in jobs] == [i * i for i in range(8)]
            assert _settled(lambda: _computation_processes(node), WAIT) == []
            assert _settled(lambda: _interrupt_pages(node), WAIT) == []
            opened = len(os.listdir(f"/proc/{node.proc.pid}/fd"))
            baseline = baseline or opened
            assert opened <= baseline, f"cluster {n}"


#: A client killed while its job runs, after sending a large file with its
#: computation: ``SPEC SECRET FILE MARKER``.
KILLED_WITH_A_FILE = """
import sys, time
from dispynb import JobCluster

def job(marker):
    import time
    open(marker, "w").close()
    time.sleep(0.5)

spec, secret, path, marker = sys.argv[1:5]
cluster = JobCluster(job, nodes=[spec], secret=secret, depends=[path])
cluster.submit(marker)
time.sleep(60)  # killed here
"""


def _message_bodies(node: CliNode) -> list[str]:
    """The node's shared memory bodies of large messages (memfds)."""
    return _descriptors(node, "dispynb-body")


@pytest.mark.timeout(90)
def test_a_file_sent_by_a_killed_client_does_not_stay_in_the_nodes_memory(
    tmp_path: Path,
) -> None:
    """3 clients killed while their jobs run, each having sent a 16 MiB file with
    its computation: once their jobs ended, the node holds none of the messages'
    bodies (before: the last file's body stayed mapped, 16 MiB of shared memory
    per client, for as long as the node kept its results: an hour)."""
    data = tmp_path / "data.bin"
    with running_node(tmp_path / "node", cpus=2) as node:
        for n in range(3):
            data.write_bytes(os.urandom(16 << 20))  # sent anew each time
            args = [node.spec, node.secret, str(data)]
            marker = tmp_path / f"started-{n}"
            _kill_a_client_once_marked(KILLED_WITH_A_FILE, args, marker, tmp_path)
        assert _settled(lambda: _session_dirs(node), 30) == []
        assert _settled(lambda: _message_bodies(node), WAIT) == []
