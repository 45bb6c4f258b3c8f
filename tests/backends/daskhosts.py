"""Real Dask clusters for the Dask engine's tests, inside network namespaces.

`dask_cluster` starts ``dask scheduler`` on one namespace host and ``dask worker`` on
others, as an administrator starts them (the ``dask`` command line, default flags but
the addresses), and stops them with their process groups. Clients run as programs
in another host (`tests.multihost.netns.start_client`), so no Dask traffic ever
leaves the namespaces the test made.

A ``dask worker`` (its nanny) makes multiprocessing queues for the worker process it
spawns: named POSIX semaphores, ``/dev/shm/sem.mp-*``, unlinked by the nanny when it
exits or, when it is killed, by multiprocessing's resource tracker (a process in the
same process group, which ignores SIGTERM and ends when its writers are gone). So a
kill -9 spares the tracker, every stop lets it end by itself, and `dask_cluster`
checks that no semaphore its processes mapped is left in ``/dev/shm``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.multihost.netns import Host, Network

#: Seconds a scheduler or worker gets to start.
START_WAIT = 30.0

#: The scheduler's port.
PORT = 8786

DASK = str(Path(sys.executable).with_name("dask"))

_WORKER_UP = re.compile(r"Start worker at:\s+(tcp://\S+)")

#: How multiprocessing names its semaphores (``sem_open`` maps them from /dev/shm).
_SEMAPHORE = re.compile(r"/dev/shm/(sem\.mp-\S+)")

#: How multiprocessing starts its resource tracker.
_TRACKER = b"multiprocessing.resource_tracker"


def _group(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _is_tracker(pid: int) -> bool:
    try:
        return _TRACKER in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_gone(pgid: int, timeout: float) -> bool:
    """Wait (bounded) for process group ``pgid`` to end by itself."""
    deadline = time.monotonic() + timeout
    while _group(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class DaskProcess:
    """A ``dask scheduler`` or ``dask worker`` process in a namespace host."""

    host: Host
    proc: subprocess.Popen[bytes]
    log: Path
    address: str = ""
    #: Named semaphores its processes mapped (seen while they lived).
    semaphores: set[str] = field(default_factory=set)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def note_semaphores(self) -> None:
        """Record the ``sem.mp-*`` names its process group has mapped."""
        for pid in _group(self.proc.pid):
            with contextlib.suppress(OSError):
                maps = Path(f"/proc/{pid}/maps").read_text()
                self.semaphores.update(_SEMAPHORE.findall(maps))

    def semaphores_left(self) -> list[str]:
        return sorted(n for n in self.semaphores if Path("/dev/shm", n).exists())

    def kill(self) -> None:
        """kill -9 the process and everything it started (the worker dies) but
        multiprocessing's resource tracker, which then unlinks the semaphores the
        killed processes left, as it does when only the worker is killed."""
        self.note_semaphores()
        deadline = time.monotonic() + START_WAIT
        while victims := [p for p in _group(self.proc.pid) if not _is_tracker(p)]:
            assert time.monotonic() < deadline, f"still alive after kill -9: {victims}"
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(0.05)  # reaps the leader, which is our child
        self.proc.wait(START_WAIT)
        _wait_gone(self.proc.pid, START_WAIT)

    def stop(self) -> None:
        """SIGTERM to the process group, as an administrator or a batch system
        stops it; SIGKILL only to what is still there after a bounded wait."""
        if self.proc.poll() is None:
            self.note_semaphores()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        if not _wait_gone(self.proc.pid, 5):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(15)


@dataclass
class DaskCluster:
    """A scheduler and its workers; `address` is the scheduler's."""

    scheduler: DaskProcess
    workers: list[DaskProcess] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.scheduler.address


def _start(
    net: Network,
    host: Host,
    argv: Sequence[str],
    log: Path,
    ready: str,
    env: dict[str, str] | None = None,
) -> DaskProcess:
    more = {} if env is None else {"env": env}
    with open(log, "wb") as out:
        proc = net.popen(
            host,
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **more,
        )
    process = DaskProcess(host, proc, log)
    deadline = time.monotonic() + START_WAIT
    while ready not in process.log_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            process.stop()
            raise AssertionError(f"{argv[1]} did not start:\n{process.log_text()}")
        time.sleep(0.05)
    process.note_semaphores()
    return process


def start_worker(
    net: Network,
    host: Host,
    scheduler: str,
    directory: Path,
    *args: str,
    env: dict[str, str] | None = None,
) -> DaskProcess:
    """``dask worker SCHEDULER --host IP`` (one process, one thread: ``args`` more;
    ``env``: its environment, else the nodes')."""
    log = directory / f"worker-h{host.index}-{time.monotonic_ns()}.log"
    argv = [
        DASK, "worker", scheduler, "--host", host.ip, "--nthreads", "1",
        "--no-dashboard", "--local-directory", str(directory / f"w{host.index}"),
        *args,
    ]  # fmt: skip
    worker = _start(net, host, argv, log, "Starting established connection", env)
    match = _WORKER_UP.search(worker.log_text())
    worker.address = match.group(1) if match else ""
    return worker


@contextlib.contextmanager
def dask_cluster(
    net: Network,
    scheduler_host: Host,
    worker_hosts: Sequence[Host],
    directory: Path,
    *worker_args: str,
) -> Iterator[DaskCluster]:
    """``dask scheduler`` on ``scheduler_host``, one ``dask worker`` per worker host;
    all stopped afterwards, whatever happened. After a test that passed, none of
    the semaphores their processes mapped may be left in /dev/shm."""
    directory.mkdir(parents=True, exist_ok=True)
    argv = [
        DASK, "scheduler", "--host", scheduler_host.ip, "--port", str(PORT),
        "--no-dashboard",
    ]  # fmt: skip
    scheduler = _start(
        net, scheduler_host, argv, directory / "scheduler.log", "Scheduler at:"
    )
    scheduler.address = f"tcp://{scheduler_host.ip}:{PORT}"
    cluster = DaskCluster(scheduler)
    try:
        for host in worker_hosts:
            cluster.workers.append(
                start_worker(net, host, scheduler.address, directory, *worker_args)
            )
        yield cluster
    finally:
        for process in [*cluster.workers, scheduler]:
            process.stop()
    left = [n for p in [*cluster.workers, scheduler] for n in p.semaphores_left()]
    assert not left, f"semaphores left in /dev/shm by the Dask processes: {left}"
