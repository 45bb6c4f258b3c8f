"""A worker the node retires (kills on purpose, after an interrupted job) never
takes a started job with it to run again under the same attempt.

`Computation` on the test's loop, its workers threads speaking the real worker
channel (`tests.inprocess`); jobs wait on gates.
"""

from __future__ import annotations

import collections

from dispynb.protocol.messages import FINISHED, TERMINATED
from tests.asyncutil import run
from tests.inprocess import gate, wait_until
from tests.nodeserver.test_computation import (
    Reports,
    finish,
    job,
    make,
    new_gate,
    open_gate,
)
from tests.nodeserver.test_stealing import RUNS, warm


def test_a_job_submitted_as_a_running_job_is_cancelled_does_not_go_to_its_worker(
    tmp_path,
):
    """Job 100 is cancelled (interrupted: its worker is retired once it ends) and
    job 200 comes meanwhile. It must not go ahead to the interrupted worker: it
    would start there as 100 ends, be reported Running, die with the worker and
    run again under the same attempt (Running twice). It runs once, on the
    worker that replaces it."""

    async def main() -> None:
        reports = Reports()
        computation, launcher = make(tmp_path, reports, workers=1)
        await warm(computation, reports, workers=1, jobs=5)
        long, entered = new_gate("long"), new_gate("entered")
        computation.submit([job(100, 100, new_gate("never"), entered)])
        await wait_until(gate(entered).is_set, "job 100 running")
        (worker,) = computation._workers.values()
        computation.cancel(100, 1)  # KeyboardInterrupt: 100 ends
        computation.submit([job(200, 200, long)])  # before 100's end is read
        await wait_until(lambda: 100 in reports.entries, "job 100 settled")
        await wait_until(
            lambda: worker.pid not in computation._workers, "its worker retired"
        )
        open_gate(long)
        await wait_until(lambda: 200 in reports.entries, "job 200 settled")
        assert reports.outcome(100) == TERMINATED
        assert reports.outcome(200) == FINISHED
        assert collections.Counter(reports.starts) == {100: 1, 200: 1}
        assert RUNS == [100, 200]
        assert worker.pid not in computation._workers
        await finish(computation, launcher)

    run(main())


def test_a_job_started_as_the_one_before_it_is_interrupted_runs_to_its_end(
    tmp_path,
):
    """Job 100 ends as it is cancelled, and its worker starts job 101 (sent ahead)
    before it reads the Skip: the node's SIGINT meant for 100 reaches the worker
    as 101 runs. The worker's interrupt page names 100's Run: 101 ignores it and
    runs to its end (it showed it runs, a provisional result: reported Running
    once), and the worker, interrupted, is replaced only then. Before the page,
    101 was hit by that SIGINT (or died with its worker, retired as 100's end was
    read) and ended crashed."""

    async def main() -> None:
        reports = Reports()
        computation, launcher = make(tmp_path, reports, workers=1)
        computation._report_file = lambda key, path, buffers, request: ""
        quick = await warm(computation, reports, workers=1, jobs=5)
        long, entered = new_gate("long"), new_gate("entered")
        computation.hold_workers(True)  # what the worker says waits unread
        computation.submit([job(100, 100, quick), job(101, 101, long, entered, True)])
        (worker,) = computation._workers.values()
        assert [j.key for j in worker.assigned] == [100, 101]
        await wait_until(gate(entered).is_set, "job 101 running after 100's end")
        computation.cancel(100, 1)  # the node still sees 100 running
        assert launcher.interrupts == [worker.pid]
        computation.hold_workers(False)
        await wait_until(lambda: 100 in reports.entries, "job 100 settled")
        assert worker.pid in computation._workers, "retired with 101 running"
        open_gate(long)
        await wait_until(lambda: 101 in reports.entries, "job 101 settled")
        assert reports.outcome(100) == FINISHED
        assert reports.outcome(101) == FINISHED, reports.reason(101)
        assert collections.Counter(reports.starts) == {100: 1, 101: 1}
        assert RUNS == [100, 101]
        await wait_until(
            lambda: worker.pid not in computation._workers, "its worker retired"
        )
        await finish(computation, launcher)

    run(main())
