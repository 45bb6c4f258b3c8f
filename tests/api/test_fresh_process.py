"""``fresh_process``: each job in a new process, or reused workers (issue 11 item 5)."""

from __future__ import annotations

import os

import pytest

from dispynb import DispyJob, JobCluster

pytestmark = pytest.mark.slow

_seen: list[int] = []  # a job's leftover state: travels with the function's globals


def remember(value: int) -> tuple[list[int], int]:
    _seen.append(value)
    return list(_seen), os.getpid()


def setup_value() -> int:
    global from_setup
    from_setup = 42  # type: ignore[name-defined]
    return 0


def read_setup_value() -> tuple[int, int]:
    return from_setup, os.getpid()  # type: ignore[name-defined]


def test_fresh_process_runs_every_job_in_a_new_process(local1):
    with JobCluster(remember, nodes=local1, fresh_process=True) as cluster:
        results = [cluster.submit(i)() for i in range(5)]
    assert [seen for seen, _pid in results] == [[i] for i in range(5)]
    assert len({pid for _seen, pid in results}) == 5


def test_reused_workers_keep_a_jobs_globals_by_default(local1):
    with JobCluster(remember, nodes=local1) as cluster:
        results = [cluster.submit(i)() for i in range(3)]
    assert results[-1][0] == [0, 1, 2]
    assert len({pid for _seen, pid in results}) == 1


def test_fresh_processes_still_see_setup_globals(local1):
    with JobCluster(
        read_setup_value, nodes=local1, setup=setup_value, fresh_process=True
    ) as cluster:
        jobs = [cluster.submit() for _ in range(4)]
        values = [job() for job in jobs]
    assert all(job.status == DispyJob.Finished for job in jobs)
    assert [value for value, _pid in values] == [42] * 4
    assert len({pid for _value, pid in values}) == 4


def test_fresh_process_with_many_jobs_in_flight(local):
    with JobCluster(remember, nodes=local, fresh_process=True) as cluster:
        jobs = [cluster.submit(i) for i in range(40)]
        results = [job() for job in jobs]
    assert [seen for seen, _pid in results] == [[i] for i in range(40)]
