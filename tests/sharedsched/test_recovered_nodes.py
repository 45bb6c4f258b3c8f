"""``recover_jobs`` through a shared scheduler names, as ``job.ip_addr``, the node
behind the scheduler that ran each job, as the crashed SharedJobCluster did and as
``recover_jobs`` does for a JobCluster's jobs: not the scheduler its journal names.
Both for a job whose end the journal has and for one that ended while the client
was away (its result kept by the scheduler)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from dispynb import recover_jobs
from dispynb.job import JobStatus
from tests.nodeproc import running_node
from tests.sharedsched.harness import SchedulerProcess, start_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: Job 0 ends at once (journaled), job 1 once ``marks/go`` exists (the client is
#: then gone: the scheduler keeps its result); says so once job 0 ended.
CLIENT = """
import os, sys, time
from dispynb import SharedJobCluster

def step(n, marks):
    import os, time
    while n and not os.path.exists(os.path.join(marks, "go")):
        time.sleep(0.02)
    return n

address, credential, journal, marks = sys.argv[1:5]
cluster = SharedJobCluster(
    step, scheduler_host=address, secret_file=credential, recover_file=journal
)
jobs = [cluster.submit(n, marks) for n in range(2)]
jobs[0]()
print("submitted", flush=True)
time.sleep(300)
"""


def test_recovered_jobs_name_the_node_behind_the_scheduler_that_ran_them(
    users: dict[str, Path], tmp_path: Path
) -> None:
    with (
        running_node(
            tmp_path / "node", "--host", "127.0.0.2", cpus=2, name="behind"
        ) as node,
        SchedulerProcess(tmp_path, [f"127.0.0.2:{node.port}"], node.secret) as sched,
    ):
        marks = tmp_path / "marks"
        marks.mkdir()
        journal = tmp_path / "step.journal"
        proc = start_client(
            CLIENT, sched.address, str(users["alice"]), str(journal),
            str(marks), cwd=tmp_path, name="step",
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line == "submitted", proc.communicate()
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=20)
        sched.wait_for_log("client gone; its jobs go on")
        (marks / "go").touch()
        sched.wait_for_log("no job of it runs, 0 wait")  # job 1's result kept
        jobs = recover_jobs(str(journal), secret_file=str(users["alice"]))
    assert [(job.status, job.result, job.ip_addr) for job in jobs] == [
        (JobStatus.Finished, 0, "127.0.0.2"),
        (JobStatus.Finished, 1, "127.0.0.2"),
    ], [(job.status, job.exception) for job in jobs]
