"""``recover_jobs`` that the scheduler refuses (one session too many for the user's
``--max_sessions``): its jobs end Abandoned in the scheduler's words, and the
journal keeps them. Before, each said "lost node ... while recovering: connection
... reset by peer; call recover_jobs again once it is back": the scheduler's
reason, which it sent before it closed the connection, was dropped.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from dispynb import SharedJobCluster, recover_jobs
from dispynb.job import JobStatus
from tests.sharedsched.harness import SchedulerProcess, start_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: A client with a recover_file: three short jobs; says once one runs, then waits
#: to be killed.
CLIENT = """
import sys, time
from dispynb import SharedJobCluster

def short(n):
    import time
    time.sleep(0.5)
    return n * n

address, credential, journal = sys.argv[1], sys.argv[2], sys.argv[3]
cluster = SharedJobCluster(
    short, scheduler_host=address, secret_file=credential, recover_file=journal
)
jobs = [cluster.submit(i) for i in range(3)]
while not any(job.status == job.Running for job in jobs):
    time.sleep(0.02)
print("submitted", flush=True)
time.sleep(300)
"""


@pytest.fixture
def scheduler_args() -> tuple[str, ...]:
    return ("--max_sessions", "1")


def square(n: int) -> int:
    return n * n


def test_a_refused_recovery_says_why_and_loses_nothing(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    journal, alice = tmp_path / "journal.db", str(users["alice"])
    proc = start_client(
        CLIENT, scheduler.address, alice, str(journal), cwd=tmp_path, name="crash"
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "submitted", proc.communicate()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=20)
    # The user's one session: recover_jobs would be a second.
    with SharedJobCluster(
        square, scheduler_host=scheduler.address, secret_file=alice
    ) as cluster:
        assert cluster.submit(3)() == 9
        jobs = recover_jobs(str(journal), secret_file=alice, timeout=30)
    assert [job.status for job in jobs] == [JobStatus.Abandoned] * 3
    for job in jobs:
        assert "its quota (dispynb-scheduler --max_sessions 1)" in job.exception
        assert "the recovery file keeps the job" in job.exception
    jobs = recover_jobs(str(journal), secret_file=alice, timeout=30)
    assert [(job.status, job.result) for job in jobs] == [
        (JobStatus.Finished, n * n) for n in range(3)
    ], [(job.status, job.exception) for job in jobs]
