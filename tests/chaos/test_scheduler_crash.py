"""A ``dispynb-scheduler`` killed with SIGKILL mid-run, then started again as an
operator would (same command, same port).

A scheduler keeps no job across a restart. Its clients must say so plainly: a job
that cannot run again ends ``Abandoned`` naming the scheduler (not a "node" at the
scheduler's address); a reentrant one runs again once the scheduler is back; and
``recover_jobs`` after the client crashed too says the scheduler no longer has the
computation and why. Real node servers and a real scheduler from the command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import DispyJob, SharedJobCluster, recover_jobs
from tests.chaos.outcomes import assert_abandoned
from tests.jobs import wait_until
from tests.nodeproc import CliNode, node_env, start_node
from tests.sharedsched.harness import SchedulerProcess, add_user

pytestmark = pytest.mark.slow

#: Jobs of each test: one per CPU of the two nodes.
JOBS = 4

#: Jobs a client submits in a loop while its scheduler is killed.
SUBMITS = 2000


def hold(n: int, marks: str, release: str) -> int:
    """Mark that job ``n`` started, wait for ``release`` (30 s at most)."""
    import os
    import time

    open(os.path.join(marks, f"{n}-{os.getpid()}"), "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return n * n


class Site:
    """Two CLI nodes, a scheduler over them, user alice, a marks folder."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.nodes: list[CliNode] = []
        self.marks = tmp_path / "marks"
        self.marks.mkdir()
        self.release = tmp_path / "release"
        self.credential = add_user(tmp_path, "alice")
        self.scheduler = SchedulerProcess(tmp_path, [], "")

    def start(self) -> None:
        for i in range(2):
            self.nodes.append(start_node(self.tmp / f"n{i}", cpus=2, name=f"n{i}"))
        self.scheduler.nodes = [node.spec for node in self.nodes]
        self.scheduler.node_secret = self.nodes[0].secret
        self.scheduler.start()

    def started(self) -> int:
        return len(list(self.marks.iterdir()))

    def crash_scheduler(self) -> None:
        """SIGKILL the scheduler (``scheduler.start()`` starts it again: the same
        command, the same port)."""
        proc = self.scheduler.proc
        assert proc is not None
        proc.kill()
        proc.wait()

    def close(self) -> None:
        self.release.touch()  # the held jobs end: the nodes stop without a drain
        self.scheduler.stop()
        for node in self.nodes:
            node.stop()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    made = Site(tmp_path)
    try:
        made.start()
        yield made
    finally:
        made.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reentrant", [False, True], ids=["plain", "reentrant"])
def test_jobs_of_a_killed_scheduler_end_naming_it_or_run_again(
    site: Site, reentrant: bool
) -> None:
    """Before, a plain job said 'node 127.0.0.1:PORT was lost', PORT the
    scheduler's: users looked for a node at that address."""
    with SharedJobCluster(
        hold,
        scheduler_host=site.scheduler.address,
        secret_file=str(site.credential),
        pulse_interval=0.2,
        reentrant=reentrant,
    ) as cluster:
        args = (str(site.marks), str(site.release))
        jobs = [cluster.submit(n, *args) for n in range(JOBS)]
        wait_until(lambda: site.started() == JOBS, timeout=30)
        site.crash_scheduler()
        if not reentrant:
            assert cluster.wait(timeout=30)
            assert_abandoned(jobs, f"scheduler {site.scheduler.address} was lost (")
        site.scheduler.start()  # same command, same port
        site.release.touch()
        if reentrant:  # they waited for the scheduler, and ran again there
            assert [job() for job in jobs] == [n * n for n in range(JOBS)]
            assert all(job.status == DispyJob.Finished for job in jobs)
            assert site.started() == 2 * JOBS
        assert cluster.submit(5, *args)() == 25  # and it serves the cluster again


#: A client with a recover_file that waits to be killed (``ADDRESS CREDENTIAL
#: JOURNAL MARKS RELEASE``).
DOOMED = """
import sys, time
from dispynb import SharedJobCluster
from tests.chaos.test_scheduler_crash import JOBS, hold

address, credential, journal, marks, release = sys.argv[1:6]
cluster = SharedJobCluster(
    hold, scheduler_host=address, secret_file=credential, recover_file=journal
)
for n in range(JOBS):
    cluster.submit(n, marks, release)
time.sleep(60)  # killed before this ends
"""


@pytest.mark.timeout(120)
def test_recover_jobs_after_the_client_and_the_scheduler_crashed_says_why(
    site: Site,
) -> None:
    """Before: 'node 127.0.0.1:PORT no longer has the computation', PORT the
    scheduler's, and not a word of the restart that lost it."""
    journal = site.tmp / "alice.journal"
    argv = [
        sys.executable, "-c", DOOMED, site.scheduler.address, str(site.credential),
        str(journal), str(site.marks), str(site.release),
    ]  # fmt: skip
    client = subprocess.Popen(argv, env=node_env(), cwd=site.tmp)
    try:
        wait_until(lambda: site.started() == JOBS, timeout=30)
    finally:
        client.kill()
        client.wait()
    site.crash_scheduler()
    site.scheduler.start()
    jobs = recover_jobs(str(journal), secret_file=str(site.credential), timeout=20)
    assert len(jobs) == JOBS
    for job in jobs:
        assert job.status == DispyJob.Abandoned, job
        reason = str(job.exception)
        assert reason.startswith(
            f"scheduler {site.scheduler.address} no longer has the computation"
        ), reason
        assert "restarted" in reason
    assert os.path.exists(journal)  # kept: nothing was recovered


def square(n: int) -> int:
    return n * n


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reentrant", [False, True], ids=["plain", "reentrant"])
def test_a_scheduler_killed_while_its_client_submits(
    site: Site, reentrant: bool
) -> None:
    """SIGKILL of the scheduler from another thread once some results came, while
    the client goes on submitting (a loop of `SUBMITS`): every submit returns,
    every job ends once the scheduler is back (a plain one it held Abandoned,
    naming it; the others Finished, the reentrant ones all), nothing hangs."""
    finished = threading.Semaphore(0)
    crashed = threading.Event()

    def crash_after_some_results() -> None:
        for _ in range(20):
            if not finished.acquire(timeout=30):
                break
        site.crash_scheduler()
        crashed.set()

    ends: Counter[int] = Counter()  # final callbacks, by job (they run in turn)

    def job_status(job: DispyJob) -> None:
        if job.status == DispyJob.Finished:
            finished.release()
        if job.status in (DispyJob.Finished, DispyJob.Abandoned):
            ends[job._args[0]] += 1

    killer = threading.Thread(target=crash_after_some_results, daemon=True)
    with SharedJobCluster(
        square,
        scheduler_host=site.scheduler.address,
        secret_file=str(site.credential),
        pulse_interval=0.2,
        reentrant=reentrant,
        job_status=job_status,
    ) as cluster:
        killer.start()
        jobs = [cluster.submit(n) for n in range(SUBMITS)]
        assert crashed.wait(30), "the scheduler ran no job"
        site.scheduler.start()  # same command, same port
        assert cluster.wait(timeout=60)
        done = [job for job in jobs if job.status == DispyJob.Finished]
        assert all(job.result == job._args[0] ** 2 for job in done)
        if reentrant:
            assert len(done) == SUBMITS
        else:  # those it held end so; those still queued here waited for it
            assert len(done) >= 20
            assert_abandoned(
                [job for job in jobs if job not in done],
                f"scheduler {site.scheduler.address} was lost (",
            )
        # And it serves the cluster again.
        assert cluster.submit(SUBMITS)() == SUBMITS**2
    assert set(ends.values()) == {1} and len(ends) == SUBMITS + 1  # each told once
