"""Sharing through a real dispynb-scheduler: fair share between users measured
(exclusive clusters: test_exclusive.py), quotas, a client killed and reattached
(nothing lost, nothing twice), a node killed (reentrant jobs run again elsewhere)."""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

import pytest

from dispynb import LocalCluster, SharedJobCluster, recover_jobs
from dispynb.errors import NodeLostError
from dispynb.job import JobStatus
from dispynb.journal import Journal
from dispynb.protocol.messages import Recover, Recovered
from tests.jobs import wait_until
from tests.sharedsched.harness import (
    TIMED_CLIENT,
    SchedulerProcess,
    busy_within,
    finish_client,
    kill_doomed_client,
    raw_reply,
    shared_window,
    start_client,
)

pytestmark = pytest.mark.slow


def nap(n: int, seconds: float) -> int:
    import time

    time.sleep(seconds)
    return n


def held(n: int, started: str, release: str) -> int:
    """Say it started (a file in ``started``), then wait for ``release`` to exist."""
    import os
    import time

    with open(os.path.join(started, f"{n}-{os.getpid()}"), "w"):
        pass
    deadline = time.monotonic() + 60
    while not os.path.exists(release):
        assert time.monotonic() < deadline, "never released"
        time.sleep(0.02)
    return n


def wait_for_files(directory: Path, count: int, timeout: float = 30) -> None:
    """Wait until ``directory`` holds ``count`` files."""
    deadline = time.monotonic() + timeout
    while len(list(directory.iterdir())) < count:
        assert time.monotonic() < deadline, sorted(directory.iterdir())
        time.sleep(0.02)


def test_equal_load_gets_equal_shares(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """Two users, each with more jobs than the 4 CPUs: while both have jobs
    waiting, each gets half of the CPU time (within 10%)."""
    procs = [
        start_client(
            TIMED_CLIENT,
            scheduler.address,
            str(users[name]),
            "40",
            "0.2",
            cwd=tmp_path,
            name=name,
        )
        for name in ("alice", "bob")
    ]
    outs = [finish_client(proc, timeout=50) for proc in procs]
    for out in outs:
        assert out["results"] == list(range(40))
    start, end = shared_window(outs)
    shares = [busy_within(out["times"], start, end) for out in outs]
    assert abs(shares[0] - shares[1]) <= 0.1 * (sum(shares) / 2), shares


def test_a_user_who_comes_next_gets_the_first_cpu_freed_after_long_jobs(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    """Alice alone runs jobs of 1.2 s on the 4 CPUs; bob submits while her second
    round runs: his first job takes the first CPU freed. Before, her jobs of the
    third round had been sent ahead to the nodes (as for short jobs, to hide a
    round trip) and ran first, so bob waited a whole job more than a free CPU (an
    hour, for hour-long jobs)."""
    with SharedJobCluster(
        nap, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as alice:
        hers = [alice.submit(i, 1.2) for i in range(16)]
        # her first round ended (the scheduler knows how long her jobs take) and
        # the second runs
        wait_until(lambda: sum(job.status == JobStatus.Finished for job in hers) >= 4)
        wait_until(lambda: sum(job.status == JobStatus.Running for job in hers) >= 4)
        # ... for 0.4 s: her client had time to send her next jobs, which went
        # ahead to the nodes before (not needed for the test to pass, but for it
        # to fail without the change)
        second = max(job.start_time for job in hers if job.start_time is not None)
        wait_until(lambda: time.time() > second + 0.4)
        with SharedJobCluster(
            nap, scheduler_host=scheduler.address, secret_file=str(users["bob"])
        ) as bob:
            since = time.time()
            his = [bob.submit(i, 0.01) for i in range(4)]
            assert [job() for job in his] == list(range(4))
            first = min(job.start_time for job in his)
        later = [
            job.start_time
            for job in hers
            if job.start_time is not None and job.start_time > since
        ]
        for job in hers:
            if not job.done():
                alice.cancel(job)
        assert later, [job.status for job in hers]
        # no job of hers that started after bob submitted started before his first
        assert first <= min(later) + 0.05, (first - since, sorted(later))


def test_quotas_cap_running_and_queued_jobs(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    sched = SchedulerProcess(
        tmp_path,
        nodes.node_specs(),
        nodes.secret,
        ("--max_cpus", "1", "--max_queued", "3"),
    ).start()
    try:
        with SharedJobCluster(
            nap, scheduler_host=sched.address, secret_file=str(users["alice"])
        ) as cluster:
            jobs = [cluster.submit(i, 0.2) for i in range(5)]
            cluster.wait(timeout=30)
            done = [job for job in jobs if job.status == JobStatus.Finished]
            refused = [job for job in jobs if job.status == JobStatus.Cancelled]
            assert len(done) >= 3 and len(done) + len(refused) == 5
            for job in refused:
                assert "--max_queued" in str(job.exception)
            spans = sorted((job.start_time, job.end_time) for job in done)
            for (_s1, e1), (s2, _e2) in itertools.pairwise(spans):
                assert s2 >= e1 - 0.02, "two jobs ran at once under --max_cpus 1"
    finally:
        sched.stop()


def test_killed_client_reattaches_and_collects_every_result_once(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    journal = tmp_path / "client.journal"
    kill_doomed_client(scheduler.address, users["alice"], journal, tmp_path)
    scheduler.wait_for_log("client gone; its jobs go on")
    jobs = recover_jobs(str(journal), secret_file=str(users["alice"]), timeout=30)
    assert sorted(job.result for job in jobs) == [n * 10 for n in range(6)]
    assert all(job.status == JobStatus.Finished for job in jobs)
    # The scheduler gave them once: the computation is gone there now.
    (recovery_id, _name, _nodes), *_ = Journal(str(journal)).computations()

    ask = Recover(comp_id=1, recovery_id=recovery_id)
    reply = raw_reply(scheduler.port, users["alice"], ask, until=Recovered)
    assert reply.found is False


def test_reentrant_jobs_of_a_killed_node_run_on_another(
    scheduler: SchedulerProcess,
    users: dict[str, Path],
    nodes: LocalCluster,
    tmp_path: Path,
) -> None:
    started = tmp_path / "started"
    started.mkdir()
    release = tmp_path / "release"
    with SharedJobCluster(
        held,
        scheduler_host=scheduler.address,
        secret_file=str(users["alice"]),
        reentrant=True,
    ) as cluster:
        jobs = [cluster.submit(i, str(started), str(release)) for i in range(8)]
        # Four jobs held at once on 2 nodes of 2 CPUs: two run on each node, so
        # the killed node surely has jobs running (not a guess from timing).
        wait_for_files(started, 4)
        os.kill(nodes.pids[0], signal.SIGKILL)
        release.touch()
        assert cluster.wait(timeout=40)
        assert [job.result for job in jobs] == list(range(8))
        assert all(job.status == JobStatus.Finished for job in jobs)
    assert "queued again" in scheduler.log_text()


def test_non_reentrant_jobs_of_a_killed_node_end_abandoned(
    scheduler: SchedulerProcess, users: dict[str, Path], nodes: LocalCluster
) -> None:
    """As with a `JobCluster` that loses a node: its running jobs (the computation
    is not reentrant) end Abandoned with the reason, the other node's finish."""
    with SharedJobCluster(
        nap, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as cluster:
        jobs = [cluster.submit(i, 3.0) for i in range(4)]  # one per CPU of 2 nodes
        wait_until(lambda: all(job.status == JobStatus.Running for job in jobs))
        os.kill(nodes.pids[0], signal.SIGKILL)
        assert cluster.wait(timeout=40)
        abandoned = [job for job in jobs if job.status == JobStatus.Abandoned]
        finished = [job for job in jobs if job.status == JobStatus.Finished]
        assert len(abandoned) == 2 and len(finished) == 2, [j.status for j in jobs]
        assert all(j.result == jobs.index(j) for j in finished)
        for job in abandoned:
            assert "was lost" in str(job.exception), job.exception
            assert "not reentrant" in str(job.exception)
            with pytest.raises(NodeLostError):
                job.future.result(timeout=5)
        assert cluster.submit(9, 0.0)() == 9  # the node left goes on serving
    assert "ended)" in scheduler.log_text()


def alice_naps(
    scheduler: SchedulerProcess, users: dict[str, Path], reentrant: bool = False
) -> SharedJobCluster:
    """Alice's cluster of `nap` at ``scheduler``."""
    return SharedJobCluster(
        nap,
        scheduler_host=scheduler.address,
        secret_file=str(users["alice"]),
        reentrant=reentrant,
    )


def test_scheduler_restart_reentrant_jobs_run_again(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    """A scheduler killed and started again on its port: the client reconnects and
    its reentrant jobs run again (the scheduler itself keeps nothing on disk: the
    nodes terminated what ran for it)."""
    with alice_naps(scheduler, users, reentrant=True) as cluster:
        jobs = [cluster.submit(i, 0.5) for i in range(8)]
        jobs[0]()
        scheduler.stop(signal.SIGKILL)
        scheduler.start()
        assert cluster.wait(timeout=45)
        assert [job.result for job in jobs] == list(range(8))
        assert all(job.status == JobStatus.Finished for job in jobs)


def test_scheduler_killed_non_reentrant_running_jobs_are_abandoned(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    """What does not survive a scheduler's death: jobs that were running (not
    reentrant) end Abandoned, with the reason; new jobs run once it is back."""
    with alice_naps(scheduler, users) as cluster:
        jobs = [cluster.submit(i, 2.0) for i in range(4)]
        wait_until(lambda: all(job.status == JobStatus.Running for job in jobs))
        scheduler.stop(signal.SIGKILL)
        assert cluster.wait(timeout=30)
        assert {job.status for job in jobs} == {JobStatus.Abandoned}
        scheduler.start()
        later = cluster.submit(7, 0.0)
        assert later() == 7


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_stopped_scheduler_says_so_to_its_users(
    scheduler: SchedulerProcess, users: dict[str, Path], reentrant: bool
) -> None:
    """``systemctl stop`` (SIGTERM) of the scheduler while jobs run: a job that
    ends with it says the scheduler stopped, and why, not 'connection closed';
    reentrant jobs wait for it and run once it is started again."""
    with alice_naps(scheduler, users, reentrant=reentrant) as cluster:
        jobs = [cluster.submit(i, 3.0) for i in range(4)]
        wait_until(lambda: all(job.status == JobStatus.Running for job in jobs))
        scheduler.stop(signal.SIGTERM)
        assert scheduler.proc is not None and scheduler.proc.returncode == 0
        if reentrant:
            scheduler.start()
            assert cluster.wait(timeout=45)
            assert [job.result for job in jobs] == list(range(4))
            return
        assert cluster.wait(timeout=30)
    for job in jobs:
        assert job.status == JobStatus.Abandoned
        assert job.exception == (
            f"scheduler {scheduler.address} stopped: the scheduler is shutting down "
            "(SIGTERM)"
        ), job.exception
