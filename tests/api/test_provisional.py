"""Provisional results: dispy_provisional_result on the node, status 7 on the client."""

from __future__ import annotations

import threading

import pytest

from dispynb import DispyJob, DispyNode, JobCluster
from tests import jobs

pytestmark = pytest.mark.slow


def test_provisional_results_job_status_sequence_is_7_7_7_11(local):
    seen: list[tuple[int, object]] = []
    done = threading.Event()

    def job_status(job: DispyJob) -> None:
        seen.append((int(job.status), job.result))
        if job.status == DispyJob.Finished:
            done.set()

    with JobCluster(jobs.provisional_then, nodes=local, job_status=job_status) as c:
        job = c.submit(4)
        assert done.wait(jobs.WAIT)
        assert job() == 40
    assert seen == [(7, 0), (7, 1), (7, 2), (11, 40)]


def test_job_loop_over_provisional_results_gets_final_results(local):
    """A dispy program that loops on job() gets each job's final result."""
    seen: dict[object, list[int]] = {}
    lock = threading.Lock()

    def job_status(job: DispyJob) -> None:
        with lock:
            seen.setdefault(job.id, []).append(int(job.status))

    with JobCluster(jobs.provisional_then, nodes=local, job_status=job_status) as c:
        submitted = [c.submit(n) for n in range(6)]
        results = [job() for job in submitted]
        assert results == [n * 10 for n in range(6)]
        assert all(job.status == DispyJob.Finished for job in submitted)
        assert all(job.finish.is_set() for job in submitted)
        assert submitted[0](clear=True) == 0  # never blocks once done
        c.wait()  # flushes the callbacks
    assert all(statuses == [7, 7, 7, 11] for statuses in seen.values())
    assert len(seen) == 6


def test_provisional_result_cluster_status_sees_provisional_between_running_and_final(
    local,
):
    events: list[int] = []

    def cluster_status(
        status: int, node: DispyNode | None, job: DispyJob | None
    ) -> None:
        if job is not None:
            events.append(int(status))

    with JobCluster(
        jobs.provisional_then, nodes=local, cluster_status=cluster_status
    ) as cluster:
        job = cluster.submit(1)
        assert job.wait(timeout=jobs.WAIT)  # job() would return a provisional result
        assert job.result == 10
        cluster.wait()  # flushes the callbacks
    assert events == [5, 6, 7, 7, 7, 11]
