"""``--zombie_interval`` (minutes, fractions taken): a client not heard from that long
has its computations closed and its CPUs freed, as dispyscheduler does; a client
that went away gets no longer than that to come back for its results."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dispynb import SharedJobCluster, recover_jobs
from dispynb.job import JobStatus
from tests.sharedsched.harness import SchedulerProcess, start_client

pytestmark = pytest.mark.slow

#: 0.1 minute: 6 s, several times the clients' one-second pings.
ZOMBIE_MINUTES = "0.1"


def nap(n: int, seconds: float) -> int:
    import time

    time.sleep(seconds)
    return n


#: A client that fills every CPU with long jobs, says so, and waits (to be stopped
#: or killed). With a third argument it keeps a recover_file there.
HOGGING_CLIENT = """
import sys, time
from dispynb import SharedJobCluster

def nap(n, seconds):
    import time
    time.sleep(seconds)
    return n

address, credential = sys.argv[1], sys.argv[2]
journal = sys.argv[3] if len(sys.argv) > 3 else None
cluster = SharedJobCluster(
    nap, scheduler_host=address, secret_file=credential, recover_file=journal
)
jobs = [cluster.submit(i, 120.0) for i in range(6)]
while sum(job.status == job.Running for job in jobs) < 4:
    time.sleep(0.05)
print("running", flush=True)
time.sleep(300)
"""


@pytest.fixture
def scheduler_args() -> tuple[str, ...]:
    """The `scheduler` fixture's: ``--zombie_interval 0.1`` (6 s)."""
    return ("--zombie_interval", ZOMBIE_MINUTES)


def _hog(
    sched: SchedulerProcess, credential: Path, tmp_path: Path, *extra: str
) -> subprocess.Popen[str]:
    proc = start_client(
        HOGGING_CLIENT, sched.address, str(credential), *extra,
        cwd=tmp_path, name="hog",
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "running":
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"client did not start its jobs: {proc.communicate()}")
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # a stopped process dies of SIGKILL too
    proc.communicate(timeout=20)


def test_stopped_client_is_a_zombie_its_cpus_go_to_another_user(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """alice fills every CPU with two-minute jobs and is SIGSTOPped (connected, but
    silent); bob, connected all along and waiting for a CPU, is not a zombie. Once
    alice is silent for the interval her jobs are terminated and bob's run."""
    alice = _hog(scheduler, users["alice"], tmp_path)
    try:
        with SharedJobCluster(
            nap,
            scheduler_host=scheduler.address,
            secret_file=str(users["bob"]),
        ) as cluster:
            os.killpg(alice.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            jobs = [cluster.submit(i, 0.2) for i in range(4)]
            assert cluster.wait(timeout=45), [job.status for job in jobs]
            waited = time.monotonic() - stopped
            assert [job.result for job in jobs] == list(range(4))
            assert all(job.status == JobStatus.Finished for job in jobs)
    finally:
        _kill(alice)
    log = scheduler.log_text()
    zombies = [line for line in log.splitlines() if "a zombie" in line]
    assert len(zombies) == 1 and "user 'alice'" in zombies[0], zombies
    # Closed by the scheduler: no node was lost. (Her running jobs are terminated
    # on the nodes, which report each one since 2c3c051: the scheduler no longer
    # counts them "ended with it"; that they ended is `waited` below.)
    assert " lost with " not in log, log
    silent = re.search(r"silent for ([0-9.]+) s", zombies[0])
    assert silent is not None and float(silent.group(1)) >= 6.0  # not before
    assert waited < 40  # her two-minute jobs did not run to their end


def test_client_gone_with_a_recover_file_gets_the_interval_at_most(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """A client killed without closing, with a recover_file (results kept an hour
    by default): after --zombie_interval its computation is closed, its jobs
    terminated; recover_jobs then finds nothing there and says so."""
    journal = tmp_path / "alice.journal"
    alice = _hog(scheduler, users["alice"], tmp_path, str(journal))
    _kill(alice)
    gone = time.monotonic()
    scheduler.wait_for_log("client gone; its jobs go on")
    # Whole seconds, as a node says it ("%g" said 5.87431, an hour 3599.75).
    kept = re.search(r"results kept ([0-9]+) s for", scheduler.log_text())
    assert kept is not None and 0 < float(kept.group(1)) <= 6.0
    scheduler.wait_for_log("did not come back: closed", timeout=30)
    assert time.monotonic() - gone < 30
    jobs = recover_jobs(str(journal), secret_file=str(users["alice"]), timeout=20)
    assert len(jobs) == 6
    assert {job.status for job in jobs} == {JobStatus.Abandoned}
    assert all("no longer has the computation" in str(j.exception) for j in jobs)
    # The CPUs are free again: bob's jobs run at once.
    with SharedJobCluster(
        nap, scheduler_host=scheduler.address, secret_file=str(users["bob"])
    ) as cluster:
        assert [cluster.submit(i, 0.0)() for i in range(4)] == list(range(4))


def slow_setup() -> int:
    import time

    time.sleep(9.0)  # 1.5 times the interval
    return 0


def test_client_waiting_for_a_long_setup_is_no_zombie(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    """A client has nothing to say while its computation sets up on the nodes (it
    pings the scheduler only once the computation is ready): a setup longer than
    --zombie_interval (a large data set loaded, or a machine under load) does not
    make it a zombie; its jobs run once the setup is done."""
    with SharedJobCluster(
        nap,
        scheduler_host=scheduler.address,
        secret_file=str(users["alice"]),
        setup=slow_setup,
    ) as cluster:
        assert cluster.submit(7, 0.0)() == 7
    assert "a zombie" not in scheduler.log_text()
