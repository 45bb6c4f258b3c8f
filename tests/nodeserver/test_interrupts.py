"""A cancel's interrupt (SIGINT to the worker) that lands before the job's code runs.

Real ``python -m nodeserver`` processes and a real client: the job's arguments take
a while to unpickle on the worker (their reconstruction waits for a file), so the
client's cancel comes while the worker has taken the job but not started it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from tests.jobs import wait_until
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow


def _held_load(marker: str) -> str:
    """Unpickled on the worker: write ``marker``, then wait (10 s at most) for the
    worker's SIGINT, which is handed to the worker's own handler."""
    import os
    import pathlib
    import signal
    import time

    received: list[int] = []
    worker_handler = signal.getsignal(signal.SIGINT)

    def note(signum: int, frame: object) -> None:
        received.append(signum)
        if callable(worker_handler):
            worker_handler(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        pathlib.Path(marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        signal.signal(signal.SIGINT, worker_handler)
    return "loaded"


class HeldArgument:
    """An argument whose unpickling on the node lasts until the worker's SIGINT."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_held_load, (self.marker,))


def mark_and_sleep(_argument: str, ran: str) -> str:
    """Write ``ran``, then sleep; a KeyboardInterrupt is caught (as dispy allows),
    from the moment ``ran`` can exist: the test cancels once it sees it."""
    import pathlib
    import time

    try:
        pathlib.Path(ran).write_text("ran")
        time.sleep(30)
    except KeyboardInterrupt:
        return "interrupted"
    return "slept"


def test_a_cancel_before_the_job_code_starts_stops_it_as_it_starts(
    tmp_path: Path,
) -> None:
    """The worker ignored the SIGINT then (no job code ran): the job ran anyway
    until the node killed its worker 3 s later. Now the interrupt is kept for it:
    the job's code never runs, and the job ends Terminated at once, as one
    interrupted at its first instruction does."""
    marker, ran = tmp_path / "loading", tmp_path / "ran"
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(mark_and_sleep, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        job = cluster.submit(HeldArgument(str(marker)), str(ran))
        wait_until(marker.exists)  # taken by the worker, its code not started
        wait_until(lambda: job.status == DispyJob.Running)
        cluster.cancel(job)
        job()
        assert job.status == DispyJob.Terminated, (job.status, job.result)
        assert "terminated at the client's request" in (job.exception or "")
        assert not ran.exists(), "the job's code ran after its cancel"
        # The next job runs as usual (on the worker that replaced that one), and
        # an interrupt during its code is its to catch.
        ran2 = tmp_path / "ran2"
        follow = cluster.submit("x", str(ran2))
        wait_until(ran2.exists)
        cluster.cancel(follow)
        assert follow() == "interrupted"
        assert follow.status == DispyJob.Finished


def slow_skip_then_wait(n: int, go: str) -> int:
    """Job 0: make this worker slow to skip a job (1.5 s, as a worker descheduled
    on a loaded machine would be, past the node's SKIP_GRACE), then wait for
    ``go``. The others return ``n`` at once."""
    if n == 0:
        import os
        import time

        from nodeserver import jobrunner

        skipped = jobrunner._skipped

        def slowly(run: object) -> object:
            time.sleep(1.5)
            return skipped(run)

        jobrunner._skipped = slowly
        deadline = time.monotonic() + 30
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # a long job: the next ones are not sent ahead of others
    return n


def test_an_interrupt_for_a_job_the_worker_skipped_hits_no_later_job(
    tmp_path: Path,
) -> None:
    """A job sent ahead and cancelled is skipped by its worker; if that worker is
    slow to say so (SKIP_GRACE), the node interrupts it, and the SIGINT, kept for
    the next job (1a3921b), stopped the next job the worker got as it started:
    that one came back Crashed ('its arguments are gone'). Now the node replaces
    a worker it interrupted that skipped the job instead: the next job runs."""
    go = tmp_path / "go"
    with (
        running_node(tmp_path / "node", cpus=1) as node,
        JobCluster(slow_skip_then_wait, nodes=[node.spec], secret=node.secret) as c,
    ):
        # Short jobs first: the node then sends jobs ahead to its busy worker.
        assert [c.submit(n, str(go))() for n in range(1, 6)] == [1, 2, 3, 4, 5]
        slow = c.submit(0, str(go))
        wait_until(lambda: slow.status == DispyJob.Running)
        ahead = c.submit(6, str(go))  # sent ahead to the one worker, behind it
        # On its way to the node: the cancel follows it there.
        wait_until(lambda: sum(n.jobs for n in c.workload().nodes.values()) == 2)
        c.cancel(ahead)
        go.touch()
        assert slow() == 0
        ahead()
        assert ahead.status == DispyJob.Cancelled, (ahead.status, ahead.exception)
        after = [c.submit(n, str(go)) for n in (7, 8)]
        assert [job() for job in after] == [7, 8], [
            (job.status, job.exception) for job in after
        ]
