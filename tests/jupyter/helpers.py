"""Jobs made without a cluster, in a chosen state, for the pure tests."""

from __future__ import annotations

from typing import Any

from dispynb.job import DispyJob, JobStatus


def make_job(
    *args: Any,
    status: JobStatus | None = None,
    result: Any = None,
    stdout: str | bytes = "",
    stderr: str | bytes = "",
    exception: str | None = None,
    node: str | None = "127.0.0.1",
    start: float | None = 1000.0,
    end: float | None = 1002.5,
    **kwargs: Any,
) -> DispyJob:
    """A job with ``args``/``kwargs``; running on ``node`` if ``status`` is Running,
    completed with ``status`` if it is final, just created if None."""
    job = DispyJob(None, args, kwargs)
    if status is None:
        return job
    if node is not None:
        job._set_running(node)
    if status is JobStatus.Running:
        return job
    job._complete(
        status,
        result=result,
        stdout=stdout,
        stderr=stderr,
        exception=exception,
        start_time=start,
        end_time=end,
        ip_addr=node,
    )
    return job


# --- run on nodes (shipped by value: this module is not installed) -------------


def mark_sleep_mark(start: str | None, seconds: float, end: str | None) -> float:
    """Create ``start``, sleep, create ``end``: a job seen to start and to finish."""
    import os
    import time

    if start is not None:
        with open(start, "w"):
            pass
    time.sleep(seconds)
    if end is not None:
        with open(f"{end}.tmp", "w"):
            pass
        os.replace(f"{end}.tmp", end)
    return seconds


def wait_then_return(gate: str | None, value: object) -> object:
    """Wait (at most 30 s) for the file ``gate``, then return ``value``."""
    import os
    import time

    deadline = time.monotonic() + 30
    while gate is not None and not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(gate)
        time.sleep(0.01)
    return value


def fail_in_helper(x: int) -> float:
    """Fail two frames down, in `_divide` (a remote traceback with two frames)."""
    return _divide(x, 0)


def _divide(a: int, b: int) -> float:
    return a / b


def provisional_then_wait(gate: str, count: int) -> str:
    """Send ``count`` provisional results (0, 1, ...), wait (at most 30 s) for the
    file ``gate``, then return ``"done"``."""
    import os
    import time

    for i in range(count):
        dispy_provisional_result(i)  # type: ignore[name-defined]  # noqa: F821
    deadline = time.monotonic() + 30
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(gate)
        time.sleep(0.01)
    return "done"


def hold_setup(marker: str, release: str) -> int:
    """A setup that writes ``marker`` and waits (60 s at most) for ``release``: a
    model loading on the nodes."""
    import os
    import time

    with open(f"{marker}.tmp", "w"):
        pass
    os.replace(f"{marker}.tmp", marker)
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return 0
