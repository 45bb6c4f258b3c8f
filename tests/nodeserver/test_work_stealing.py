"""Jobs sent ahead to a busy worker whose job turns out long run on an idle one.

A real 2-CPU node (`LocalCluster`): its computation's jobs are short on average,
so it sends them ahead to busy workers; one job then waits (for a file) while the
others are instant. Asserted on the order of events and on where and how often
each job ran, never on elapsed time.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster, LocalCluster
from tests.jobs import WAIT, log_or_wait

pytestmark = pytest.mark.slow


def test_quick_jobs_do_not_wait_behind_a_long_one_while_a_cpu_is_free(tmp_path):
    """Before, the quick jobs sent ahead to the long job's worker waited for it
    while the node's other CPU had nothing left to do."""
    log, flag = str(tmp_path / "log"), str(tmp_path / "go")
    with (
        LocalCluster(cpus=2) as node,
        JobCluster(log_or_wait, nodes=node) as cluster,
    ):
        warm = [cluster.submit(log, -x, flag) for x in range(1, 21)]  # mean: short
        assert all(job.finish.wait(WAIT) for job in warm)
        long = cluster.submit(log, 0, flag)
        quick = [cluster.submit(log, x, flag) for x in range(1, 40)]
        for job in quick:
            assert job.finish.wait(WAIT), f"job {job.id} waited behind the long one"
        assert not long.finish.is_set()  # it waits for the flag: the others ended first
        Path(flag).touch()
        assert long.finish.wait(WAIT)
        assert long.status == DispyJob.Finished
        assert all(job.status == DispyJob.Finished for job in quick)
        # Each ran in a worker other than the long job's, which was busy.
        assert all(job.result != long.result for job in quick)
    # Every job ran exactly once.
    runs = collections.Counter(
        int(line.split()[0]) for line in Path(log).read_text().splitlines()
    )
    assert runs == collections.Counter(range(-20, 40))
