"""A cancel's SIGINT reaches only the job it was meant for.

Real ``python -m nodeserver`` processes and a real client. The node names the job
it interrupts in its worker's interrupt page before it signals the worker; a job
that ended just as it was cancelled leaves that SIGINT to no one, whatever job its
worker started next.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from dispynb.scheduler.link import DEAD_AFTER
from tests.jobs import wait_until
from tests.nodeproc import CliNode, running_node

pytestmark = pytest.mark.slow

#: Seconds a test job waits for the file that ends it, at most.
JOB_WAIT = 30.0

#: Seconds a test keeps its node stopped, at most: under the time its client takes
#: to declare a silent node dead (DEAD_AFTER pulses of 1 s).
STOPPED_AT_MOST = DEAD_AFTER - 1.0

#: Quick jobs run before a test's race: the node sends a job ahead to a busy worker
#: only while its mean job time (an average weighing each new job 0.2) is under
#: 10 ms, and a worker's first job (loading the function) may take 50 ms or more
#: on a loaded machine: 5 left the mean over 10 ms (0.8**4 x 50), 20 do not.
WARM_UP = 20


def act(n: int, role: str, folder: str) -> int:
    """A test job. ``quick``: return ``n``. ``ending``: return ``n`` once the file
    ``end-<n>`` exists. ``noting``: note its start (a line of ``starts-<n>``) and
    each SIGINT its worker gets (the file ``sigint-<n>``, then the worker's own
    handler), and return ``n`` once ``end-<n>`` exists."""
    import pathlib
    import signal
    import time

    here = pathlib.Path(folder)
    if role == "quick":
        return n
    worker_handler = signal.getsignal(signal.SIGINT)
    if role == "noting":
        with open(here / f"starts-{n}", "a") as starts:
            starts.write("started\n")

        def note(signum: int, frame: object) -> None:
            (here / f"sigint-{n}").touch()
            if callable(worker_handler):
                worker_handler(signum, frame)

        signal.signal(signal.SIGINT, note)
    try:
        deadline = time.monotonic() + JOB_WAIT
        while not (here / f"end-{n}").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        signal.signal(signal.SIGINT, worker_handler)
    return n


def _received_unread(port: int) -> int:
    """Bytes that connections to this host's ``port`` received and the listener's
    process has not read (/proc/net/tcp's rx_queue of its sockets)."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            rows = handle.read().splitlines()[1:]
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                total += int(fields[4].split(":")[1], 16)
    return total


def _cancel_as_it_ends(
    cluster: JobCluster, node: CliNode, folder: Path, key: int
) -> tuple[DispyJob, DispyJob, bool]:
    """Job ``key`` runs, ``key + 1`` waits behind it in the same worker. The node
    is stopped (SIGSTOP) while the client cancels ``key`` (the cancel waits in the
    node's socket) and ``key`` ends, so that its worker starts ``key + 1`` before
    it could be told to skip it; then the node goes on (SIGCONT) and finds the
    cancel first: it interrupts the worker for ``key``, which it still sees
    running. Returns both jobs, and whether the node started ``key + 1`` before
    the node resumed (else it went elsewhere: the race was not set up)."""
    folder.mkdir()
    ending = cluster.submit(key, "ending", str(folder))
    wait_until(lambda: ending.status == DispyJob.Running)
    noting = cluster.submit(key + 1, "noting", str(folder))
    # Sent ahead to the busy worker, behind `ending` (the jobs are short so far).
    wait_until(lambda: sum(n.jobs for n in cluster.workload().nodes.values()) == 2)
    unread = _received_unread(node.port)
    os.kill(node.proc.pid, signal.SIGSTOP)
    # Stopped for less than its client takes to declare it dead: if the node had
    # not sent `key + 1` ahead, its worker never starts it, and the race was not set
    # up (the caller tries again); a node declared dead would end this attempt's jobs.
    deadline = time.monotonic() + STOPPED_AT_MOST
    try:
        cluster.cancel(ending)
        while _received_unread(node.port) <= unread and time.monotonic() < deadline:
            time.sleep(0.005)
        (folder / f"end-{key}").touch()
        while not (folder / f"starts-{key + 1}").exists():
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)
    return ending, noting, (folder / f"starts-{key + 1}").exists()


def test_a_job_started_as_the_one_before_it_is_cancelled_runs_to_its_end(
    tmp_path: Path,
) -> None:
    """The job started as the one before it ends and is cancelled gets the SIGINT
    meant for that one: before, it ended with a KeyboardInterrupt (or died with
    its worker, replaced as the cancelled job's end was read) and ran again
    (twice in all), or ended crashed. Now it ignores that SIGINT, runs once, to
    its end, and finishes with its value; the cancelled job, ended already,
    finishes with its own. Tried until the node's SIGINT reached the second job
    (5 times at most)."""
    hit = False
    with (
        running_node(tmp_path / "node", cpus=1) as node,
        JobCluster(act, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        for attempt in range(5):
            # Short jobs first: the node then sends jobs ahead to its busy worker.
            quick = [cluster.submit(n, "quick", "") for n in range(WARM_UP)]
            assert [job() for job in quick] == list(range(WARM_UP))
            folder = tmp_path / f"try-{attempt}"
            key = 100 * (attempt + 1)
            ending, noting, started = _cancel_as_it_ends(cluster, node, folder, key)
            assert ending() == key, (ending.status, ending.exception)
            assert ending.status == DispyJob.Finished
            if started:
                # The node read the cancel first: its SIGINT is on its way now
                # (a loaded machine may take seconds to deliver it: waited for up
                # to 10 s, or this attempt's job ends unhit and the test tries again).
                deadline = time.monotonic() + 10
                while not (folder / f"sigint-{key + 1}").exists():
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.005)
            (folder / f"end-{key + 1}").touch()
            assert noting() == key + 1, (noting.status, noting.exception)
            assert noting.status == DispyJob.Finished
            starts = (folder / f"starts-{key + 1}").read_text().splitlines()
            assert len(starts) == 1, f"job {key + 1} ran {len(starts)} times"
            if (folder / f"sigint-{key + 1}").exists():
                hit = True
                break
        # The jobs after it run as usual (on the worker that replaced that one).
        after = [cluster.submit(n, "quick", "") for n in (7, 8)]
        assert [job() for job in after] == [7, 8]
    assert hit, "the node's SIGINT never reached the job started after the cancel"


def stint(n: int, until: float, log: str) -> int:
    """A test job: note its run (a line ``n`` in ``log``), then wait until the
    wall-clock time ``until`` (at most 1 s; a job started after it returns at
    once); return ``n``. A KeyboardInterrupt ends it, as any exception does."""
    import os
    import time

    handle = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(handle, f"{n}\n".encode())
    finally:
        os.close(handle)
    end = min(until, time.time() + 1.0)
    while time.time() < end:
        pass
    return n


#: Seconds the stress test runs its rounds (each round is a few milliseconds).
STRESS_SECONDS = 15.0


def test_cancels_as_jobs_end_stop_only_the_jobs_cancelled(tmp_path: Path) -> None:
    """Rounds of short jobs on a node of 2 CPUs (several wait ahead in each
    worker); in each round one job is cancelled about when it ends (its end is a
    wall-clock time the client knows, the cancel sent a random -1 to +1 ms from
    it). Every job not cancelled finishes once, with its value; a cancelled one
    ends Cancelled (never ran), Terminated (interrupted) or Finished (it ended
    first), and runs once at most. Before the interrupt page, a job started as
    the one before it was cancelled could be interrupted by that SIGINT and run
    again, or end crashed."""
    import random

    log = tmp_path / "runs.log"
    rounds = 0
    outcomes: dict[int, list[DispyJob]] = {}
    with (
        running_node(tmp_path / "node", cpus=2) as node,
        JobCluster(stint, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        warm = [cluster.submit(n, 0.0, str(log)) for n in range(-20, 0)]
        assert [job() for job in warm] == list(range(-20, 0))
        stop = time.monotonic() + STRESS_SECONDS
        key = 0
        chosen: dict[int, DispyJob] = {}
        others: dict[int, DispyJob] = {}
        while time.monotonic() < stop:
            rounds += 1
            now = time.time()
            batch = []
            target = key + random.randrange(2, 8)
            for _ in range(10):
                until = now + 0.002 if key != target else now + 0.004
                batch.append((key, cluster.submit(key, until, str(log))))
                key += 1
            (cancelled,) = [job for k, job in batch if k == target]
            time.sleep(
                max(now + 0.004 + random.uniform(-0.001, 0.001) - time.time(), 0)
            )
            cluster.cancel(cancelled)
            for k, job in batch:
                (chosen if k == target else others)[k] = job
                job.wait(timeout=30)
        runs = [int(line) for line in log.read_text().split()]
    counts = {n: runs.count(n) for n in set(runs)}
    for k, job in others.items():
        assert job.status == DispyJob.Finished, (k, job.status, job.exception)
        assert job.result == k
        assert counts.get(k) == 1, f"job {k} ran {counts.get(k, 0)} times"
    for k, job in chosen.items():
        assert job.status in (
            DispyJob.Cancelled,
            DispyJob.Terminated,
            DispyJob.Finished,
        ), (k, job.status, job.exception)
        assert counts.get(k, 0) <= 1, f"job {k} ran {counts[k]} times"
        if job.status == DispyJob.Finished:
            assert job.result == k
    outcomes = {}
    for job in chosen.values():
        outcomes.setdefault(job.status, []).append(job)
    print(rounds, {status: len(jobs) for status, jobs in outcomes.items()})


def _moving_job_that_runs(
    node: CliNode, folder: Path, stop: str
) -> tuple[DispyJob | None, JobCluster]:
    """A cluster on ``node`` whose job 2 started as job 1 ended and was cancelled,
    the node having read the cancel first (its SIGINT for job 1 reached job 2's
    worker): to the node, job 2 moves away (told to skip) and may have started.
    Then ``stop`` (the cluster's ``close_node``, or ``"sigterm"`` for the node).
    Returns job 2 (None if the node read job 1's end first: try again) and the
    cluster, to close."""
    cluster = JobCluster(act, nodes=[node.spec], secret=node.secret)
    try:
        return _move_job_that_runs(cluster, node, folder, stop), cluster
    except BaseException:
        # Its jobs end (the node waits for none of them as it stops), and the
        # failure shows, not a node that did not stop.
        cluster.close(terminate=True)
        raise


def _move_job_that_runs(
    cluster: JobCluster, node: CliNode, folder: Path, stop: str
) -> DispyJob | None:
    """`_moving_job_that_runs` on ``cluster``."""
    quick = [cluster.submit(n, "quick", "") for n in range(WARM_UP)]
    assert [job() for job in quick] == list(range(WARM_UP))
    ending, noting, started = _cancel_as_it_ends(cluster, node, folder, 1)
    assert ending() == 1, (ending.status, ending.exception)
    if started:
        deadline = time.monotonic() + 2
        while not (folder / "sigint-2").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
    if not (folder / "sigint-2").exists():
        (folder / "end-2").touch()
        noting()
        return None
    if stop == "sigterm":
        node.proc.send_signal(signal.SIGTERM)  # the node drains: jobs may end
        wait_until(lambda: "draining:" in node.log_text())  # it handed back
    else:
        assert cluster.close_node(node.spec) == 0
        # Time for the node to drop the jobs not started with job 2 running: a
        # shorter wait makes the test weaker, never wrong.
        time.sleep(0.2)
    (folder / "end-2").touch()
    return noting


@pytest.mark.parametrize("stop", ["close_node", "sigterm"])
def test_a_job_moving_away_that_runs_is_not_dropped_as_not_started(
    tmp_path: Path, stop: str
) -> None:
    """A job that started as the one before it was cancelled (to the node: told to
    skip, moving away, perhaps started) when the node drops the jobs that have not
    started (close_node, or the node's shutdown): it was reported not started
    (Cancelled, or handed back) while it ran on, and its client ran it again
    elsewhere or waited for it forever. Now the worker's answer says: it runs to
    its end, and finishes once, with its value."""
    noting = None
    for attempt in range(5):
        with running_node(tmp_path / f"node-{attempt}", cpus=1) as node:
            folder = tmp_path / f"try-{attempt}"
            noting, cluster = _moving_job_that_runs(node, folder, stop)
            try:
                if noting is not None:
                    assert noting.wait(timeout=20), noting.status
                    assert noting.status == DispyJob.Finished, (
                        noting.status,
                        noting.exception,
                    )
                    assert noting.result == 2
                    starts = (folder / "starts-2").read_text().splitlines()
                    assert len(starts) == 1, f"job 2 ran {len(starts)} times"
                    break
            finally:
                cluster.close(terminate=True)
    assert noting is not None, "job 2 never moved away as it ran"
