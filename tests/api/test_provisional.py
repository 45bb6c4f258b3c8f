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


def test_provisional_result_job_clear_returns_each_in_turn(local):
    def compute(n: int) -> int:
        for i in range(3):
            dispy_provisional_result(i)  # type: ignore[name-defined]  # noqa: F821
            time.sleep(0.05)  # type: ignore[name-defined]  # noqa: F821
        return n

    with JobCluster(compute, nodes=local) as cluster:
        job = cluster.submit(99)
        first = job(clear=True)
        assert first in (0, 1, 2)
        assert job.wait(timeout=jobs.WAIT)
        assert job() == 99
        assert job.status == DispyJob.Finished


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
