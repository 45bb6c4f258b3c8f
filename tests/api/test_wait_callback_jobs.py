"""``cluster.wait()`` waits for the jobs that callbacks submit as jobs end, as dispy's
``job_scheduler`` example does (a ``cluster_status`` callback that submits the next
file's job when one is done): it returns once no job is left, not while one that a
callback just submitted is still pending."""

from __future__ import annotations

import threading
import time

import pytest

from dispynb import DispyJob, JobCluster

pytestmark = pytest.mark.slow

WAIT = 30.0  # seconds; reached only when the test fails


def square(n: int) -> int:
    """The jobs' computation."""
    return n * n


@pytest.mark.timeout(60)
def test_wait_returns_after_the_jobs_callbacks_submitted(local):
    chain = 3  # each finished job's callback submits the next, up to this many
    submitted: list[DispyJob] = []

    def job_status(job: DispyJob) -> None:
        if job.status != DispyJob.Finished or len(submitted) >= chain:
            return
        # Late, as a callback that reads a file first: wait() has seen no job left
        # by then (and waits for this callback); the fixed wait passes however late.
        time.sleep(0.5)
        submitted.append(cluster.submit(len(submitted)))

    with JobCluster(square, nodes=local, job_status=job_status) as cluster:
        submitted.append(cluster.submit(0))
        assert cluster.wait(timeout=WAIT) is True
        assert len(submitted) == chain
        assert [job.status for job in submitted] == [DispyJob.Finished] * chain
        assert cluster.status().jobs_pending == 0


@pytest.mark.timeout(60)
def test_wait_with_a_timeout_says_false_while_a_jobs_callback_still_runs(local):
    """``wait(timeout)`` waits for the done jobs' callbacks within ``timeout``: one
    still running when it passes makes it return False, as its docstring says
    (it returned True, and a dispy program that reads what its callbacks gather
    once ``wait`` says all is done read it unfinished)."""
    entered, release = threading.Event(), threading.Event()
    gathered: list[int] = []

    def job_status(job: DispyJob) -> None:
        if job.status == DispyJob.Finished:
            entered.set()
            release.wait(WAIT)
            gathered.append(job.result)

    with JobCluster(square, nodes=local, job_status=job_status) as cluster:
        job = cluster.submit(3)
        assert entered.wait(WAIT)  # the job is done; its callback runs on
        assert job.done()
        assert cluster.wait(timeout=0.2) is False
        assert gathered == []
        release.set()
        assert cluster.wait(timeout=WAIT) is True
        assert gathered == [9]


@pytest.mark.timeout(60)
def test_wait_runs_the_callback_of_a_job_a_callback_submitted_that_ended_already(
    local,
):
    """A callback submits a job, which ends before that callback returns: wait()
    saw its jobs done, waited for the callbacks, and saw none left, but the new
    job's own callback was still to run (it returned True with that callback's work
    undone: a loaded machine let the job end while wait() was woken)."""
    heard: list[int] = []

    def job_status(job: DispyJob) -> None:
        if job.status != DispyJob.Finished:
            return
        if job.result == 4:
            time.sleep(0.5)  # a callback that works a while (wait() must wait)
        heard.append(job.result)
        if job.result == 0:
            time.sleep(0.5)  # wait() is waiting for this callback by then
            cluster.submit(2)
            # The job it submitted ends before this callback returns.
            deadline = time.monotonic() + WAIT
            while cluster.status().jobs_pending and time.monotonic() < deadline:
                time.sleep(0.01)

    with JobCluster(square, nodes=local, job_status=job_status) as cluster:
        cluster.submit(0)
        assert cluster.wait(timeout=WAIT) is True
        assert heard == [0, 4]
