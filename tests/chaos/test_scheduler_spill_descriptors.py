"""Results a ``dispynb-scheduler`` keeps for a killed client, spilled to disk while
the scheduler has no file descriptor left (``ulimit -n``, ``LimitNOFILE=``).

A result the scheduler cannot write is kept as an error saying why (as for a full
disk), which the client's ``recover_jobs`` then gets. Why must be the scheduler's
real trouble: it said 'the scheduler's disk is full (Too many open files)', and
sent its operator to make room on a disk that had plenty. A real node, scheduler
and client process from the command line; the limit lowered on the running
scheduler (``prlimit --pid``) to the descriptors it holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import DispyJob, recover_jobs
from tests.chaos.onenode import scheduler_over_one_node
from tests.chaos.test_scheduler_descriptors import leave_descriptors, set_nofile
from tests.sharedsched.test_kept import _kill_client_after_submit

pytestmark = pytest.mark.slow

#: ``ADDRESS CREDENTIAL JOURNAL GO``: one job returning 1 MiB at once, then two
#: that wait for ``GO`` (30 s at most) before they do; says ``submitted`` once
#: both run, and waits to be killed.
CLIENT = """
import sys, time
from dispynb import SharedJobCluster

def wait_then_return(n, go):
    import os, time
    deadline = time.monotonic() + 30
    while n >= 0 and not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return bytes([n % 256]) * (1 << 20)

address, credential, journal, go = sys.argv[1:]
cluster = SharedJobCluster(
    wait_then_return, scheduler_host=address, secret_file=credential,
    recover_file=journal,
)
# At once: the scheduler checks a large message (and imports the cipher for it)
# while it has descriptors.
assert len(cluster.submit(-1, go)()) == 1 << 20
jobs = [cluster.submit(n, go) for n in range(2)]
while sum(job.status == job.Running for job in jobs) < 2:
    time.sleep(0.05)
print("submitted", flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(90)
def test_a_result_the_scheduler_has_no_descriptor_to_spill_says_so(
    tmp_path: Path,
) -> None:
    journal, go = tmp_path / "journal", tmp_path / "go"
    # Their starts are kept in memory, their results go to a spill file.
    with scheduler_over_one_node(tmp_path, "--kept_memory", "512K", cpus=2) as (
        scheduler,
        credential,
    ):
        assert scheduler.proc is not None
        pid = scheduler.proc.pid
        _kill_client_after_submit(
            scheduler, credential, journal, tmp_path, CLIENT, str(go)
        )
        before = leave_descriptors(pid, spare=False)
        try:
            go.touch()
            scheduler.wait_for_log("no job of it runs, 0 waiting")  # both ended
        finally:
            set_nofile(pid, before)
        log = scheduler.log_text()
        jobs = recover_jobs(str(journal), secret_file=str(credential), timeout=30)
    said = (
        "the scheduler is out of file descriptors (Too many open files); have its "
        "limit raised (LimitNOFILE=, ulimit -n)"
    )
    ended = [job for job in jobs if job.status != DispyJob.Finished]
    assert len(ended) == 2, jobs  # the two the client left
    assert all(job.status == DispyJob.Terminated for job in ended), ended
    assert all(said in str(job.exception) for job in ended), [
        j.exception for j in ended
    ]
    assert "disk" not in str(ended[0].exception)
    [warned] = [line for line in log.splitlines() if "was not kept" in line]
    assert said in warned and " is full " not in warned, warned
