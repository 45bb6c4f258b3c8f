"""Jobs sent ahead to a busy worker whose job turns out long run on an idle one.

A real 2-CPU node (`LocalCluster`): its computation's jobs are short on average,
so it sends them ahead to busy workers; one job then waits (for a file) while the
others are instant. Asserted on the order of events and on where and how often
each job ran, never on elapsed time.
"""

from __future__ import annotations

import collections
import threading
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster, LocalCluster
from tests.jobs import WAIT, log_or_wait

pytestmark = pytest.mark.slow


def test_quick_jobs_do_not_wait_behind_a_long_one_while_a_cpu_is_free(tmp_path):
    """Before, the quick jobs sent ahead to the long job's worker waited for it
    while the node's other CPU had nothing left to do. Each job is reported
    Running once, before it finishes (jobs taken back from a worker included)."""
    log, flag = str(tmp_path / "log"), str(tmp_path / "go")
    events: list[tuple[int, object]] = []
    lock = threading.Lock()

    def cluster_status(status: int, node: object, job: DispyJob | None) -> None:
        if job is not None and status in (DispyJob.Running, DispyJob.Finished):
            with lock:
                events.append((status, job.id))

    with (
        LocalCluster(cpus=2) as node,
        JobCluster(log_or_wait, nodes=node, cluster_status=cluster_status) as cluster,
    ):
        # The mean: short (jobs go ahead to busy workers).
        warm = [cluster.submit_job_id(-x, log, -x, flag) for x in range(1, 21)]
        assert all(job.finish.wait(WAIT) for job in warm)
        long = cluster.submit_job_id(0, log, 0, flag)
        quick = [cluster.submit_job_id(x, log, x, flag) for x in range(1, 40)]
        for job in quick:
            assert job.finish.wait(WAIT), f"job {job.id} waited behind the long one"
        assert not long.finish.is_set()  # it waits for the flag: the others ended first
        Path(flag).touch()
        assert long.finish.wait(WAIT)
        assert long.status == DispyJob.Finished
        assert all(job.status == DispyJob.Finished for job in quick)
        # Each ran in a worker other than the long job's, which was busy.
        assert all(job.result != long.result for job in quick)
    # Every job ran exactly once, and was reported Running once, then Finished.
    runs = collections.Counter(
        int(line.split()[0]) for line in Path(log).read_text().splitlines()
    )
    assert runs == collections.Counter(range(-20, 40))
    with lock:
        seen = list(events)
    for key in range(-20, 40):
        mine = [status for status, job_id in seen if job_id == key]
        assert mine == [DispyJob.Running, DispyJob.Finished], (key, mine)
