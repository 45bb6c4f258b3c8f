"""A client on one host is killed with SIGKILL; a new client process recovers its jobs.

The nodes on two other hosts keep running the dead client's jobs and keep their
results; ``recover_jobs`` gets every job back, each once, with id, arguments, result.
"""

from __future__ import annotations

import pytest

from tests.multihost.conftest import Site
from tests.multihost.netns import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

JOBS = 12

WORKER = """
import os, time
import dispynb as dispy

def compute(n, marks, release):
    import os, time
    open(os.path.join(marks, str(n)), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(release):  # still running when the client is killed
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.01)
    return n * n

def main(args):
    cluster = dispy.JobCluster(compute, nodes=args["nodes"], secret=args["secret"],
                               recover_file=args["journal"], pulse_interval=0.2)
    for n in range(args["jobs"]):
        cluster.submit_job_id("job-%d" % n, n, args["marks"], args["release"])
    time.sleep(120)  # killed before this returns
"""

RECOVER = """
import dispynb as dispy

def main(args):
    jobs = dispy.recover_jobs(args["journal"], timeout=60, secret=args["secret"])
    return [[job.id, job._args[0], int(job.status), job.result] for job in jobs]
"""


def test_client_killed_then_recovered_gets_every_job_once(site: Site) -> None:
    # A CPU a job on each node: however the client spreads them (it may send a node
    # two a CPU before the other joins), every job runs until the test releases it.
    nodes = [site.start(host, cpus=JOBS) for host in site.node_hosts[:2]]
    marks = site.directory / "marks"
    marks.mkdir()
    release = site.directory / "release"
    args = {
        "nodes": [node.spec for node in nodes],
        "secret": site.secret,
        "journal": str(site.directory / "journal.db"),
        "marks": str(marks),
        "release": str(release),
        "jobs": JOBS,
    }
    client = site.start_client(WORKER, args, site.directory / "c1")
    try:
        wait_for(lambda: len(list(marks.iterdir())) == JOBS, 30, "all jobs running")
    finally:
        client.proc.kill()  # SIGKILL, mid-run
        client.stop()
        release.touch()  # the dead client's jobs may end
    recovered = site.start_client(RECOVER, args, site.directory / "c2")
    jobs = recovered.result(timeout=90)
    assert [job[0] for job in jobs] == [f"job-{n}" for n in range(JOBS)]
    assert [job[1] for job in jobs] == list(range(JOBS))
    assert [job[2] for job in jobs] == [11] * JOBS  # Finished, each exactly once
    assert [job[3] for job in jobs] == [n * n for n in range(JOBS)]
    # Each job ran once: one marker per job, never a second run.
    assert sorted(int(p.name) for p in marks.iterdir()) == list(range(JOBS))
