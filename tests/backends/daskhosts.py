"""Real Dask clusters for the Dask engine's tests, inside network namespaces.

`dask_cluster` starts ``dask scheduler`` on one namespace host and ``dask worker`` on
others, as an administrator starts them (the ``dask`` command line, default flags but
the addresses), and stops them with their process groups. Clients run as programs
in another host (`tests.multihost.netns.start_client`), so no Dask traffic ever
leaves the namespaces the test made.
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


@dataclass
class DaskProcess:
    """A ``dask scheduler`` or ``dask worker`` process in a namespace host."""

    host: Host
    proc: subprocess.Popen[bytes]
    log: Path
    address: str = ""

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9 the process and everything it started (the worker dies)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(START_WAIT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
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
    net: Network, host: Host, argv: Sequence[str], log: Path, ready: str
) -> DaskProcess:
    with open(log, "wb") as out:
        proc = net.popen(
            host, argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    process = DaskProcess(host, proc, log)
    deadline = time.monotonic() + START_WAIT
    while ready not in process.log_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            process.stop()
            raise AssertionError(f"{argv[1]} did not start:\n{process.log_text()}")
        time.sleep(0.05)
    return process


def start_worker(
    net: Network, host: Host, scheduler: str, directory: Path, *args: str
) -> DaskProcess:
    """``dask worker SCHEDULER --host IP`` (one process, one thread: ``args`` more)."""
    log = directory / f"worker-h{host.index}-{time.monotonic_ns()}.log"
    argv = [
        DASK, "worker", scheduler, "--host", host.ip, "--nthreads", "1",
        "--no-dashboard", "--local-directory", str(directory / f"w{host.index}"),
        *args,
    ]  # fmt: skip
    worker = _start(net, host, argv, log, "Starting established connection")
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
    all stopped afterwards, whatever happened."""
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
