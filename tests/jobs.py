"""Job functions for end-to-end tests, defined at module level in a test module.

They run on real nodes: this module is not installed, so `JobCluster` ships it by
value with cloudpickle (the node never imports ``tests.jobs``). Jobs that must be
seen to start write a marker file that the test waits for (see `wait_for_path`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Seconds a test waits for something that should take milliseconds.
WAIT = 10.0


# --- run on nodes -------------------------------------------------------------


def square(x: int) -> int:
    return x * x


def echo(value: object) -> object:
    """Write to stdout and stderr, then return ``value``."""
    print(f"out {value}")
    print(f"err {value}", file=sys.stderr)
    return value


def worker_pid(_: object = None) -> int:
    return os.getpid()


def mark_and_sleep(marker: str | None, seconds: float) -> int:
    """Write this worker's pid to ``marker`` (the job has started), then sleep.

    With no marker and no sleep it is a trivial job of a few microseconds.
    """
    if marker is not None:
        tmp = f"{marker}.tmp"
        with open(tmp, "w") as handle:
            handle.write(str(os.getpid()))
        os.replace(tmp, marker)
    if seconds:
        time.sleep(seconds)
    return os.getpid()


def log_and_sleep(log: str, seconds: float) -> int:
    """Append this worker's pid to ``log`` (a line per start of the job), then
    sleep; return the pid. ``log`` shows whether, how often and where it ran."""
    with open(log, "a") as handle:
        handle.write(f"{os.getpid()}\n")
    if seconds:
        time.sleep(seconds)
    return os.getpid()


def log_or_wait(log: str, x: int, flag: str) -> int:
    """Append ``x`` and this worker's pid to ``log`` (a line per run of the job);
    job 0 then waits for the file ``flag`` (30 s at most): a long job among quick
    ones. Returns the pid."""
    with open(log, "a") as handle:
        handle.write(f"{x} {os.getpid()}\n")
    deadline = time.monotonic() + 30.0
    while x == 0 and not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.005)
    return os.getpid()


def sleep_unless_interrupted(marker: str, seconds: float) -> str:
    """Write ``marker``, sleep; return "interrupted" on KeyboardInterrupt (cancel)."""
    # write then rename: a test polling for the file never reads it half-written
    Path(f"{marker}.tmp").write_text(str(os.getpid()))
    os.replace(f"{marker}.tmp", marker)
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        return "interrupted"
    return "slept"


def hold_through_interrupt(marker: str, release: str, limit: float = WAIT) -> str:
    """Write ``marker``, then wait until ``release`` exists (at most ``limit`` s),
    ignoring KeyboardInterrupt (a cancel): a job the node must kill after its grace
    period. Returns "released" or "held"."""
    Path(f"{marker}.tmp").write_text(str(os.getpid()))
    os.replace(f"{marker}.tmp", marker)
    deadline = time.monotonic() + limit
    while not os.path.exists(release) and time.monotonic() < deadline:
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(0.005)
    return "released" if os.path.exists(release) else "held"


def mark_and_hold(marker: str, release: str, limit: float = WAIT) -> float:
    """Write ``marker`` (the job has started), wait until ``release`` exists (at most
    ``limit`` s), and return when the job started (epoch seconds)."""
    started = time.time()
    Path(f"{marker}.tmp").write_text(str(os.getpid()))
    os.replace(f"{marker}.tmp", marker)
    deadline = time.monotonic() + limit
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.005)
    return started


def hold_with_a_child(record: str, release: str, limit: float = 60.0) -> int:
    """A slow setup (a model loading): start a child process, write this process's
    pid and the child's to ``record``, and wait until ``release`` exists (at most
    ``limit`` s)."""
    import subprocess

    child = subprocess.Popen(["sleep", "120"])
    Path(f"{record}.tmp").write_text(f"{os.getpid()} {child.pid}")
    os.replace(f"{record}.tmp", record)
    deadline = time.monotonic() + limit
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.005)
    return 0


def still_running(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still run now (a zombie has ended)."""
    import psutil

    running = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
    return running


def provisional_then(n: int) -> int:
    """Send three provisional results, then return ``n * 10``."""
    for i in range(3):
        dispy_provisional_result(i)  # type: ignore[name-defined]  # noqa: F821
    return n * 10


def echo_bytes(data: bytes) -> tuple[int, str, bytes]:
    """Return the length and SHA-256 of ``data`` as seen on the node, and ``data``."""
    return len(data), hashlib.sha256(data).hexdigest(), data


def raise_value_error(value: object) -> None:
    raise ValueError(f"bad value {value!r}")


def misbehave(kind: str) -> object:
    """Crash in the way ``kind`` names; ``'ok'`` returns ``'ok'``."""
    if kind == "raise":
        raise_value_error(42)
    elif kind == "sys_exit":
        sys.exit(3)
    elif kind == "os_exit":
        os._exit(3)
    elif kind == "segfault":
        ctypes.string_at(0)
    elif kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "lock_result":
        return threading.Lock()
    elif kind == "generator_result":
        return (i for i in range(3))
    elif kind == "ok":
        return "ok"
    raise AssertionError(f"unknown kind {kind!r}")


class Polynomial:
    """A class used by `evaluate`, so that it must travel with the function."""

    def __init__(self, *coefficients: int) -> None:
        self.coefficients = coefficients

    def __call__(self, x: int) -> int:
        return sum(c * x**i for i, c in enumerate(self.coefficients))


def _shift(value: int) -> int:
    return value + 1000


def evaluate(x: int) -> tuple[int, bool]:
    """``1 + 2x + 3x^2 + 1000`` via a class and a helper of this module.

    Also tells whether the node imported ``tests.jobs`` (it should not need to).
    """
    return _shift(Polynomial(1, 2, 3)(x)), "tests.jobs" in sys.modules


# --- test side ----------------------------------------------------------------


def jobs_held(cluster: Any, node: Any) -> int:
    """How many of ``cluster``'s jobs ``node`` holds: running, or sent ahead to
    wait in its queue (`JobCluster.node_jobs` lists only the running ones)."""
    node_id = cluster._node_id(node)
    backend = cluster._backend
    if node_id is None or backend is None:
        return 0
    return len(backend._on_loop(backend.driver.running_keys, node_id))


def wait_for_path(path: str | os.PathLike[str], timeout: float = WAIT) -> None:
    """Poll until ``path`` exists; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll until ``predicate()`` is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)


def logged_pids(log: str | os.PathLike[str]) -> list[int]:
    """The pids `log_and_sleep` wrote to ``log`` (none if it never ran)."""
    try:
        text = Path(log).read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.splitlines() if line]


def read_pid(path: str | os.PathLike[str]) -> int:
    return int(Path(path).read_text())


def is_computation_process(proc: Any) -> bool:
    """Whether psutil's ``proc`` is a computation process or one of its workers: a
    ``python -m nodeserver.compute`` process, or one the node's zygote forked
    (`nodeserver.zygote`: named ``dispynb-compute``; the zygote itself is not)."""
    from nodeserver.zygote import COMPUTE_NAME

    return bool(
        proc.name() == COMPUTE_NAME or "nodeserver.compute" in " ".join(proc.cmdline())
    )


def computation_processes(node: Any) -> list[Any]:
    """The computation processes and workers below psutil's ``node`` (a node
    server): its descendants except its zygote."""
    import psutil

    found = []
    for proc in node.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if is_computation_process(proc):
                found.append(proc)
    return found


def wait_for_computation_processes(count: int, timeout: float = WAIT) -> None:
    """Wait until this test process has ``count`` computation processes below it.

    A computation process and its workers are all computation processes
    (`is_computation_process`): a node with ``cpus`` CPUs has ``1 + cpus`` of them
    once every worker is forked. The node forks its second and later workers a
    little after the first job ran (the first one is made inside its pids cgroup
    ahead of need), so a module fixture waits here before its tests start counting
    processes.
    """
    import psutil

    wait_until(lambda: len(computation_processes(psutil.Process())) >= count, timeout)
