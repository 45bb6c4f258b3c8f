"""Per-job limits: ``job_timeout``/``dispy_job_timeout`` and ``mem_limit``.

End to end with real node processes on 127.0.0.1 (the module's shared nodes, see
conftest.py): the node stops a job that runs over its time limit and replaces its
worker; a job over its memory limit gets ``MemoryError`` while the node's own memory
stays flat and the worker is usable again.
"""

from __future__ import annotations

import os
import resource
import signal
import stat
import time
from pathlib import Path

import psutil
import pytest

from dispynb import DispyJob, JobCluster
from dispynb.errors import ConfigurationError
from dispynb.options import ClusterOptions
from tests.jobs import WAIT, read_pid, square, wait_for_path, wait_until

pytestmark = pytest.mark.slow

#: A job with a 1 s limit must be reported terminated this soon after it started
#: (1 s, then KeyboardInterrupt, then SIGKILL after a 2 s grace at worst).
TIMEOUT_BOUND = 3.5

MiB = 1 << 20
GiB = 1 << 30


# --- run on nodes -------------------------------------------------------------


def spin(marker: str, ignore_interrupt: bool) -> None:
    """Write this worker's pid to ``marker``, then loop for ever."""
    if ignore_interrupt:  # only SIGKILL can stop it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    # write then rename: the test polling for the file never reads it half-written
    Path(f"{marker}.tmp").write_text(str(os.getpid()))
    os.replace(f"{marker}.tmp", marker)
    while True:
        pass


def nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def allocate(size: int) -> int:
    """Allocate ``size`` bytes and touch them; return the worker's pid."""
    block = bytearray(size)
    block[::4096] = b"x" * len(block[::4096])
    return os.getpid()


def address_space_limit(_: object = None) -> tuple[int, int]:
    """The worker's pid and its soft RLIMIT_AS (after the job before it)."""
    return os.getpid(), resource.getrlimit(resource.RLIMIT_AS)[0]


def nap_unless_interrupted(seconds: float) -> str:
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        return "interrupted"
    return "slept"


def crash(_: object = None) -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


# --- time limit -----------------------------------------------------------------


@pytest.mark.parametrize("ignore_interrupt", [False, True], ids=["loop", "no-sigint"])
def test_job_timeout_terminates_busy_job_and_replaces_worker(
    local, tmp_path, ignore_interrupt
):
    marker = tmp_path / "spinning"
    with JobCluster(spin, nodes=local, job_timeout=1) as cluster:
        job = cluster.submit(str(marker), ignore_interrupt)
        wait_for_path(marker)
        started = time.monotonic()
        spinner = read_pid(marker)
        assert job.wait(timeout=WAIT)
        elapsed = time.monotonic() - started
    assert job.status == DispyJob.Terminated
    assert "ran over its time limit of 1 s (job_timeout / dispy_job_timeout)" in (
        job.exception
    )
    assert "dispy_job_timeout=" in job.exception  # how to raise it
    assert elapsed < TIMEOUT_BOUND, f"terminated after {elapsed:.2f} s"
    wait_until(lambda: not psutil.pid_exists(spinner))


def test_timeout_of_one_job_leaves_others_alone_and_worker_is_replaced(local, tmp_path):
    marker = tmp_path / "spinning"
    with JobCluster(spin, nodes=local) as cluster:
        looping = cluster.submit(str(marker), False, dispy_job_timeout=1)
        wait_for_path(marker)
        spinner = read_pid(marker)
        # Jobs without a limit on the same node run to the end, during and after.
        with JobCluster(nap, nodes=local) as other:
            naps = [other.submit(0.3) for _ in range(6)]
            assert other.wait(timeout=WAIT)
        assert looping.wait(timeout=WAIT)
    assert looping.status == DispyJob.Terminated
    assert "time limit of 1 s" in looping.exception
    assert [job.status for job in naps] == [DispyJob.Finished] * 6
    wait_until(lambda: not psutil.pid_exists(spinner))
    # The replaced worker runs jobs again.
    with JobCluster(nap, nodes=local) as cluster:
        job = cluster.submit(0)
        assert job.wait(timeout=WAIT)
    assert job.status == DispyJob.Finished
    assert job.result != spinner


def test_job_within_its_timeout_finishes_and_none_lifts_cluster_limit(local):
    with JobCluster(nap, nodes=local, job_timeout=0.5) as cluster:
        quick = cluster.submit(0.05)
        unlimited = cluster.submit(1.0, dispy_job_timeout=None)
        assert cluster.wait(timeout=WAIT)
    assert quick.status == DispyJob.Finished
    # Finished also shows the keyword was taken out: nap() does not accept it.
    assert unlimited.status == DispyJob.Finished


def test_timed_out_job_that_catches_the_interrupt_still_ends_terminated(local):
    """Unlike a cancel (dispy: it may return a value), running over is a failure."""
    with JobCluster(nap_unless_interrupted, nodes=local, job_timeout=1) as cluster:
        job = cluster.submit(30)
        assert job.wait(timeout=WAIT)
    assert job.status == DispyJob.Terminated
    assert job.result is None
    assert "time limit of 1 s" in job.exception


SLEEPER = """#!/bin/sh
echo $$ > "$1"
sleep 60
"""


def _in_group(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` (still alive, not zombies)."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


def test_program_over_its_timeout_is_killed_with_its_process_group(local, tmp_path):
    program = tmp_path / "sleeper.sh"
    program.write_text(SLEEPER)
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    marker = tmp_path / "group"
    with JobCluster(str(program), nodes=local, job_timeout=1) as cluster:
        job = cluster.submit(str(marker))
        wait_for_path(marker)
        wait_until(lambda: marker.read_text().strip().isdigit())
        pgid = int(marker.read_text())
        started = time.monotonic()
        wait_until(lambda: len(_in_group(pgid)) >= 1)
        assert job.wait(timeout=WAIT)
        elapsed = time.monotonic() - started
    assert job.status == DispyJob.Terminated
    assert "time limit of 1 s" in job.exception
    assert elapsed < TIMEOUT_BOUND
    wait_until(lambda: not _in_group(pgid))  # the shell and its sleep


# --- memory limit ---------------------------------------------------------------


def test_mem_limit_gives_memory_error_and_node_memory_stays_flat(local1):
    node = psutil.Process(local1.pids[0])
    with JobCluster(allocate, nodes=local1, mem_limit="512M") as cluster:
        warm = cluster.submit(MiB)  # the node has served a job before measuring
        assert warm.wait(timeout=WAIT)
        before = node.memory_info().rss
        job = cluster.submit(4 * GiB)
        assert job.wait(timeout=WAIT)
        after = node.memory_info().rss
        # The same worker, without a limit, can map more than the limit again.
        big = cluster.submit(600 * MiB, dispy_job_mem_limit=None)
        assert big.wait(timeout=WAIT)
    assert job.status == DispyJob.Terminated
    assert "MemoryError" in job.exception
    assert f"mem_limit of {512 * MiB} bytes" in job.exception
    assert after - before < 50 * MiB, f"node RSS grew by {(after - before) >> 20} MiB"
    assert big.status == DispyJob.Finished
    assert big.result == warm.result  # the worker was reused, not replaced


def map_memory(size: int) -> int:
    """Map ``size`` bytes of anonymous memory (as a library's arena would)."""
    import mmap

    with mmap.mmap(-1, size) as block:
        return len(block)


def test_an_mmap_refused_under_mem_limit_names_the_limit(local1):
    with JobCluster(map_memory, nodes=local1, mem_limit="512M") as cluster:
        job = cluster.submit(4 * GiB)
        assert job.wait(timeout=WAIT)
    assert job.status == DispyJob.Terminated
    assert "Cannot allocate memory" in job.exception  # OSError(ENOMEM)
    assert f"mem_limit of {512 * MiB} bytes" in job.exception


def test_mem_limit_is_lifted_for_the_next_job_of_a_reused_worker(local1):
    with JobCluster(address_space_limit, nodes=local1) as cluster:
        limited = cluster.submit(dispy_job_mem_limit=256 * MiB)
        assert limited.wait(timeout=WAIT)
        after = cluster.submit()
        assert after.wait(timeout=WAIT)
    assert limited.result[1] == 256 * MiB
    assert after.result[0] == limited.result[0]  # same worker
    assert after.result[1] == resource.RLIM_INFINITY


def test_worker_dying_under_mem_limit_says_probably_exceeded(local1):
    with JobCluster(crash, nodes=local1, mem_limit=GiB) as cluster:
        job = cluster.submit()
        assert job.wait(timeout=WAIT)
    assert job.status == DispyJob.Terminated
    assert "SIGSEGV" in job.exception
    assert f"probably exceeded mem_limit of {GiB} bytes" in job.exception


# --- validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (256 * MiB, 256 * MiB),
        ("512M", 512 * MiB),
        ("2G", 2 * GiB),
        ("1.5g", 3 * GiB // 2),
        ("64MiB", 64 * MiB),
        ("100000000", 100_000_000),
    ],
)
def test_mem_limit_values_are_normalised_to_bytes(value, expected):
    assert ClusterOptions.from_kwargs(square, mem_limit=value).mem_limit == expected


@pytest.mark.parametrize("value", ["lots", "-5M", "12X", 1.5, True, MiB, [1]])
def test_bad_mem_limit_is_a_configuration_error(value):
    with pytest.raises(ConfigurationError, match=r"mem_limit .*(bytes|512M)"):
        ClusterOptions.from_kwargs(square, mem_limit=value)


@pytest.mark.parametrize("value", [0, -1, "5", True, float("inf"), float("nan")])
def test_bad_job_timeout_is_a_configuration_error(value):
    with pytest.raises(ConfigurationError, match="job_timeout must be a positive"):
        ClusterOptions.from_kwargs(square, job_timeout=value)


@pytest.mark.parametrize("value", [0, -1, "5", True, float("inf"), float("nan")])
def test_bad_setup_timeout_is_a_configuration_error(value):
    with pytest.raises(ConfigurationError, match="setup_timeout must be a positive"):
        ClusterOptions.from_kwargs(square, setup_timeout=value)


def test_job_timeout_default_is_none_and_numbers_become_floats():
    assert ClusterOptions.from_kwargs(square).job_timeout is None
    assert ClusterOptions.from_kwargs(square).mem_limit is None
    assert ClusterOptions.from_kwargs(square, job_timeout=2).job_timeout == 2.0


def test_bad_per_job_limits_are_refused_at_submit(local):
    with JobCluster(square, nodes=local) as cluster:
        with pytest.raises(ConfigurationError, match="dispy_job_timeout"):
            cluster.submit(2, dispy_job_timeout=-1)
        with pytest.raises(ConfigurationError, match="dispy_job_mem_limit"):
            cluster.submit(2, dispy_job_mem_limit="huge")
        job = cluster.submit(2)
        assert job.wait(timeout=WAIT)
    assert job.result == 4
