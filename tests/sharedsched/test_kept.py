"""Results kept for a client that went away are bounded: in memory up to
``--kept_memory`` (the rest spill to private files on disk), per computation up to
``--max_kept`` (past it: a clear error per job, and its other jobs wait); a client
that comes back collects every result once."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from dispynb import LocalCluster, recover_jobs
from dispynb.job import JobStatus
from dispynb.journal import Journal
from dispynb.protocol.messages import Recover, Recovered
from dispynb.secret import read_secret_file
from dispynb.transport.connector import connect
from tests.jobs import wait_until
from tests.nodeproc import running_node
from tests.sharedsched.harness import SchedulerProcess, start_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MiB = 1 << 20
#: Each job's result; 8 jobs (what the client sends the scheduler at once: two per
#: CPU of its 4) keep 192 MiB for the client.
RESULT = 24 * MiB
JOBS = 8
#: What the scheduler may keep in memory (--kept_memory).
KEPT_MEMORY = 8 * MiB

#: A client with a recover_file: JOBS jobs returning RESULT bytes each; says once the
#: scheduler has them all (the first one runs), then waits to be killed.
BIG_RESULTS_CLIENT = f"""
import sys, time
from dispynb import SharedJobCluster

def big(n):
    import time
    time.sleep(0.5)
    return n.to_bytes(4, "big") * ({RESULT} // 4)

address, credential, journal = sys.argv[1], sys.argv[2], sys.argv[3]
cluster = SharedJobCluster(
    big, scheduler_host=address, secret_file=credential, recover_file=journal
)
jobs = [cluster.submit(i) for i in range({JOBS})]
while not any(job.status == job.Running for job in jobs):
    time.sleep(0.02)
print("submitted", flush=True)
time.sleep(300)
"""


def expected(n: int) -> bytes:
    return n.to_bytes(4, "big") * (RESULT // 4)


def _scheduler(
    tmp_path: Path, nodes: LocalCluster, *args: str
) -> Iterator[SchedulerProcess]:
    spill = ("--dest_path_prefix", str(tmp_path / "spill"))
    with SchedulerProcess.owning(tmp_path, nodes, *spill, *args) as sched:
        yield sched


@pytest.fixture
def spilling(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> Iterator[SchedulerProcess]:
    """A scheduler that keeps at most 8 MiB of results in memory."""
    yield from _scheduler(tmp_path, nodes, "--kept_memory", "8M")


@pytest.fixture
def quota(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> Iterator[SchedulerProcess]:
    """A scheduler that keeps 40 MiB of results per computation at most."""
    yield from _scheduler(tmp_path, nodes, "--max_kept", "40M")


def _kill_client_after_submit(
    sched: SchedulerProcess,
    credential: Path,
    journal: Path,
    tmp_path: Path,
    script: str = BIG_RESULTS_CLIENT,
    *args: str,
) -> None:
    proc = start_client(
        script, sched.address, str(credential), str(journal), *args,
        cwd=tmp_path, name="big",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "submitted", proc.communicate()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=20)
    sched.wait_for_log("client gone; its jobs go on")


def _status(pid: int, field: str) -> int:
    """``VmRSS``/``VmHWM`` of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def _spill_files(pid: int, prefix: Path) -> list[tuple[str, int, int]]:
    """``(path, mode, size)`` of the files ``pid`` has open under ``prefix``."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        link = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(link)
            info = os.stat(link)
        except FileNotFoundError:
            continue
        # (a directory held open is the scheduler's lock on its spill: 16e314e9)
        if target.startswith(str(prefix)) and stat.S_ISREG(info.st_mode):
            found.append((target, stat.S_IMODE(info.st_mode), info.st_size))
    return found


def _found_again(port: int, credential: Path, journal: Path) -> bool:
    """Whether the scheduler still has the journal's computation (a raw Recover)."""
    (recovery_id, _name, _nodes), *_ = Journal(str(journal)).computations()

    async def ask() -> bool:
        conn, _ = await connect(
            "127.0.0.1",
            port,
            secret=read_secret_file(credential),
            max_message_size=1 << 20,
        )
        try:
            conn.write(Recover(comp_id=1, recovery_id=recovery_id))
            async with asyncio.timeout(10):
                while True:
                    message, _ = await conn.recv()
                    if isinstance(message, Recovered):
                        return message.found
        finally:
            conn.close()

    return asyncio.run(ask())


def test_results_kept_for_a_killed_client_spill_and_arrive_once(
    spilling: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    assert spilling.proc is not None
    pid = spilling.proc.pid
    rss_before = _status(pid, "VmRSS")
    journal = tmp_path / "big.journal"
    _kill_client_after_submit(spilling, users["alice"], journal, tmp_path)
    spilling.wait_for_log("no job of it runs, 0 wait", timeout=60)
    # 192 MiB kept: at most 8 MiB of it in memory; the scheduler's peak stays far
    # below what it keeps (the documented bound: --kept_memory plus a few results
    # in flight).
    growth = _status(pid, "VmHWM") - rss_before
    assert growth < KEPT_MEMORY + 4 * RESULT, growth / MiB
    files = _spill_files(pid, tmp_path / "spill")
    assert files, "nothing spilled"
    on_disk = sum(size for _path, _mode, size in files)
    assert on_disk >= JOBS * RESULT - KEPT_MEMORY
    for path, mode, _size in files:
        assert mode == 0o600, (path, oct(mode))
        name = Path(path.removesuffix(" (deleted)")).name
        assert len(name) == 32 and int(name, 16) >= 0  # 128 random bits
        directory = Path(path).parent
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    jobs = recover_jobs(str(journal), secret_file=str(users["alice"]), timeout=60)
    assert len(jobs) == JOBS
    assert all(job.status == JobStatus.Finished for job in jobs)
    assert sorted(job.result for job in jobs) == [expected(n) for n in range(JOBS)]
    assert not _found_again(spilling.port, users["alice"], journal)
    assert _spill_files(pid, tmp_path / "spill") == []  # read back, closed


def test_over_its_quota_a_result_becomes_an_error_and_other_jobs_wait(
    quota: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """--max_kept 40M: one 24-MiB result is kept, the others that end while the
    client is away are replaced by an error naming the option, and the jobs still
    queued wait for the client, which then gets their results: each job once."""
    journal = tmp_path / "big.journal"
    _kill_client_after_submit(quota, users["alice"], journal, tmp_path)
    quota.wait_for_log("no job of it runs, ", timeout=60)
    log = quota.log_text()
    assert "was not kept for its client" in log
    held = re.search(r"no job of it runs, (\d+) wait", log)
    assert held is not None and int(held.group(1)) >= 1  # held, not run and lost
    jobs = recover_jobs(str(journal), secret_file=str(users["alice"]), timeout=60)
    # One 24-MiB result fits in 40 MiB; those that ended later while the client
    # was away did not; the held ones ran once it was back.
    assert_recovered_once(jobs, kept=1, held=int(held.group(1)), why="--max_kept")
    assert not _found_again(quota.port, users["alice"], journal)


def assert_recovered_once(jobs: list[Any], kept: int, held: int, why: str) -> None:
    """Each job once: finished with its own result, or (one at least) terminated
    with none and an exception saying ``why``; ``kept`` of them finished while the
    client was away, and the ``held`` ones once it was back."""
    assert len(jobs) == JOBS
    finished = [job for job in jobs if job.status == JobStatus.Finished]
    failed = [job for job in jobs if job.status == JobStatus.Terminated]
    assert len(finished) + len(failed) == JOBS, [j.status for j in jobs]
    assert len(failed) >= 1 and len(finished) >= kept + held
    for job in failed:
        assert why in str(job.exception) and job.result is None
    results = {job.result for job in finished}
    assert len(results) == len(finished)
    assert results <= {expected(n) for n in range(JOBS)}


#: One job returning random bytes just over the node's streaming threshold (its
#: result travels in ResultChunk messages); names a file after their SHA-256.
STREAMED_CLIENT = """
import sys, time
from dispynb import SharedJobCluster

def big(marks, size):
    import hashlib, os, time
    data = os.urandom(size)
    open(os.path.join(marks, hashlib.sha256(data).hexdigest()), "w").close()
    time.sleep(0.5)
    return data

address, credential, journal, marks, size = sys.argv[1:]
cluster = SharedJobCluster(
    big, scheduler_host=address, secret_file=credential, recover_file=journal
)
job = cluster.submit(marks, int(size))
print("submitted", flush=True)
time.sleep(300)
"""


def _one_job_kept(
    program: str,
    size: int,
    scheduler: SchedulerProcess,
    credential: Path,
    tmp_path: Path,
    name: str,
) -> tuple[Path, Path]:
    """Run a client ``program`` (one job, which marks a file when it has run),
    SIGKILL it once the job ran and wait until the scheduler keeps its result:
    its journal, and the folder of marks."""
    journal = tmp_path / f"{name}.journal"
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = start_client(
        program, scheduler.address, str(credential), str(journal),
        str(marks), str(size), cwd=tmp_path, name=name,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "submitted", proc.communicate()
        wait_until(lambda: any(marks.iterdir()))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=20)
    scheduler.wait_for_log("no job of it runs, 0 wait", timeout=60)
    return journal, marks


@pytest.mark.parametrize(
    "limit", [{}, {"max_message_size": 4 * MiB}], ids=["default", "small-limit"]
)
def test_a_streamed_result_kept_for_a_killed_client_is_recovered_whole(
    scheduler: SchedulerProcess,
    users: dict[str, Path],
    tmp_path: Path,
    limit: dict[str, int],
) -> None:
    """The scheduler keeps a result over the streaming threshold as its chunks and
    entry; recover_jobs reassembles it (status Finished, same SHA-256). A client
    recovering it with ``max_message_size=4M`` gets it in messages of at most 4 MiB
    (the node's 16 MiB chunks cut again by the scheduler), not a refused frame."""
    from nodeserver.computation import STREAM_BYTES

    size = STREAM_BYTES + 4096  # the smallest result that streams, and a little
    journal, marks = _one_job_kept(
        STREAMED_CLIENT, size, scheduler, users["alice"], tmp_path, "streamed"
    )
    jobs = recover_jobs(
        str(journal), secret_file=str(users["alice"]), timeout=60, **limit
    )
    (digest,) = [mark.name for mark in marks.iterdir()]
    assert [(job.status, job.exception) for job in jobs] == [(JobStatus.Finished, None)]
    result = jobs[0].result
    assert isinstance(result, bytes) and len(result) == size
    assert hashlib.sha256(result).hexdigest() == digest


def flood(mib: int) -> int:
    """Print ``mib`` MiB (lines of 1 MiB) and return it."""
    for _ in range(mib):
        print("x" * (MiB - 1))
    return mib


def test_a_client_with_a_small_max_message_size_gets_a_large_output_whole(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    """Live, through the scheduler: a client taking messages of 2 MiB at most and
    keeping all output gets a job's 6 MiB of stdout whole (the node cuts it to the
    limit the client gave, which the scheduler passes on), and keeps its session."""
    from dispynb import SharedJobCluster

    with SharedJobCluster(
        flood,
        scheduler_host=scheduler.address,
        secret_file=str(users["alice"]),
        max_message_size=2 * MiB,
        max_output_size=None,
    ) as cluster:
        job = cluster.submit(6)
        assert job() == 6, job.exception
        assert job.stdout == ("x" * (MiB - 1) + "\n") * 6
        assert cluster.submit(1)() == 1


#: One job that sends a 3 MiB file (dispy_send_file) and a 3 MiB provisional result,
#: prints 3 MiB and returns 3 MiB: all kept for its client, killed meanwhile.
LARGE_KEPT_CLIENT = """
import sys, time
from dispynb import SharedJobCluster

def large(marks, size):
    import os, time
    with open("sent.bin", "wb") as f:
        f.write(b"f" * size)
    dispy_send_file("sent.bin")
    dispy_provisional_result(b"p" * size)
    print("o" * size)
    open(os.path.join(marks, "sent"), "w").close()
    time.sleep(0.5)
    return b"r" * size

address, credential, journal, marks, size = sys.argv[1:]
cluster = SharedJobCluster(
    large, scheduler_host=address, secret_file=credential, recover_file=journal
)
job = cluster.submit(marks, int(size))
print("submitted", flush=True)
time.sleep(300)
"""


def test_a_client_recovering_with_a_small_limit_gets_what_was_kept_within_it(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """A job's 3 MiB file, provisional result, stdout and result kept for a killed
    client (that took 1 GiB messages): recover_jobs with ``max_message_size=1M``
    gets the result and stdout whole, in chunks, and keeps its connection (the
    file and provisional result, which cannot be cut, are left out with a logged
    reason), instead of a frame over its limit that lost the scheduler."""
    size = 3 * MiB
    journal, _marks = _one_job_kept(
        LARGE_KEPT_CLIENT, size, scheduler, users["alice"], tmp_path, "large"
    )
    jobs = recover_jobs(
        str(journal), secret_file=str(users["alice"]), timeout=60, max_message_size=MiB
    )
    assert [(job.status, job.exception) for job in jobs] == [(JobStatus.Finished, None)]
    assert jobs[0].result == b"r" * size
    assert jobs[0].stdout == "o" * size + "\n"
    log = scheduler.log_text()
    assert "file 'sent.bin' of job" in log and "provisional result of job" in log
    assert log.count("over the max_message_size of 1048576 bytes") == 2, log[-3000:]


#: One job that runs 13 s (longer than a recovering client waits for a word from
#: the scheduler, `RECOVERY_SILENCE`); marks a file once it started.
LONG_JOB_CLIENT = """
import sys, time
from dispynb import SharedJobCluster

def long(marks):
    import os, time
    open(os.path.join(marks, "started"), "w").close()
    time.sleep(13)
    return "done"

address, credential, journal, marks = sys.argv[1:]
cluster = SharedJobCluster(
    long, scheduler_host=address, secret_file=credential, recover_file=journal
)
job = cluster.submit(marks)
print("submitted", flush=True)
time.sleep(300)
"""


@pytest.fixture
def slow_pulse(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> Iterator[SchedulerProcess]:
    """A scheduler that reports to its clients every 60 s unless they ask sooner."""
    yield from _scheduler(tmp_path, nodes, "--pulse_interval", "60")


def test_recover_jobs_waits_for_a_long_job_through_a_scheduler_with_a_slow_pulse(
    slow_pulse: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """recover_jobs given no timeout waits for a job still running (dispy's
    default) through a scheduler whose --pulse_interval is 60 s: the scheduler
    reports at the recovering client's pulse, so the client does not take it for a
    stopped one and give the job up."""
    from dispynb.recovery import RECOVERY_SILENCE

    assert RECOVERY_SILENCE < 13
    journal = tmp_path / "long.journal"
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = start_client(
        LONG_JOB_CLIENT, slow_pulse.address, str(users["alice"]), str(journal),
        str(marks), cwd=tmp_path, name="long",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "submitted", proc.communicate()
        wait_until(lambda: any(marks.iterdir()))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=20)
    slow_pulse.wait_for_log("client gone; its jobs go on")
    jobs = recover_jobs(str(journal), secret_file=str(users["alice"]))
    assert [(job.status, job.result, job.exception) for job in jobs] == [
        (JobStatus.Finished, "done", None)
    ]


#: A client with a recover_file whose two jobs run two minutes, each leaving its
#: process id in a file; says once both run, then waits to be killed.
ENDLESS_CLIENT = """
import os, sys, time
from dispynb import SharedJobCluster

def endless(n, marks):
    import os, time
    with open(os.path.join(marks, str(n)), "w") as mark:
        mark.write(str(os.getpid()))
    time.sleep(120)

address, credential, journal, marks = sys.argv[1:5]
cluster = SharedJobCluster(
    endless, scheduler_host=address, secret_file=credential, recover_file=journal
)
jobs = [cluster.submit(i, marks) for i in range(2)]
while len(os.listdir(marks)) < 2:
    time.sleep(0.02)
print("submitted", flush=True)
time.sleep(300)
"""


def _endless_jobs_left(
    sched: SchedulerProcess, credential: Path, tmp_path: Path
) -> tuple[Path, Path]:
    """Run ENDLESS_CLIENT until both its jobs run, kill it; its journal and the
    folder where each job left its process id."""
    marks = tmp_path / "marks"
    marks.mkdir()
    journal = tmp_path / "endless.journal"
    _kill_client_after_submit(
        sched, credential, journal, tmp_path, ENDLESS_CLIENT, str(marks)
    )
    return journal, marks


def _recovered_terminated(journal: Path, credential: Path) -> None:
    """recover_jobs(timeout=1, terminate_pending=True): both jobs come back
    Terminated."""
    jobs = recover_jobs(
        str(journal), secret_file=str(credential), timeout=1, terminate_pending=True
    )
    assert [job.status for job in jobs] == [JobStatus.Terminated] * 2, [
        (job.status, job.exception) for job in jobs
    ]


def test_recover_jobs_terminate_pending_terminates_them_through_the_scheduler(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """recover_jobs(timeout, terminate_pending=True) through a shared scheduler:
    the jobs still running then are terminated on the nodes and come back
    Terminated, as from nodes a JobCluster used."""
    journal, marks = _endless_jobs_left(scheduler, users["alice"], tmp_path)
    pids = [int(mark.read_text()) for mark in marks.iterdir()]
    _recovered_terminated(journal, users["alice"])
    wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids))


def test_jobs_running_at_recover_jobs_timeout_keep_their_start_through_the_scheduler(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """recover_jobs(timeout) through a shared scheduler: the jobs still running come
    back Running with the time they started on their nodes, as the client that
    crashed showed them (they came back with no start time: the scheduler had told
    that client, and kept nothing of it)."""
    before = time.time()
    journal, marks = _endless_jobs_left(scheduler, users["alice"], tmp_path)
    began = [mark.stat().st_mtime for mark in marks.iterdir()]
    try:
        jobs = recover_jobs(str(journal), secret_file=str(users["alice"]), timeout=1)
    finally:  # the nodes' CPUs free for the next test
        recover_jobs(
            str(journal),
            secret_file=str(users["alice"]),
            timeout=0,
            terminate_pending=True,
        )
    assert [job.status for job in jobs] == [JobStatus.Running] * 2, jobs
    for job in jobs:
        assert job.start_time is not None, job
        assert before - 1 <= job.start_time <= max(began) + 1, (job.start_time, began)


def test_recover_jobs_with_another_users_credential_loses_no_job(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """recover_jobs given bob's credential for alice's journal says the scheduler
    keeps the computation for another user, and alice's recovery then gets her
    jobs. Before, bob's call was told the computation was gone, and the journal
    recorded alice's jobs Abandoned for good: her own recovery got nothing."""
    journal, _ = _endless_jobs_left(scheduler, users["alice"], tmp_path)
    wrong = recover_jobs(str(journal), secret_file=str(users["bob"]), timeout=1)
    assert [job.status for job in wrong] == [JobStatus.Abandoned] * 2
    assert all(
        "keeps this computation for another user, not for user 'bob'" in job.exception
        for job in wrong
    ), [job.exception for job in wrong]
    _recovered_terminated(journal, users["alice"])


def test_jobs_running_at_recover_jobs_timeout_name_the_node_behind_the_scheduler(
    users: dict[str, Path], tmp_path: Path
) -> None:
    """A job still running at recover_jobs' timeout names the node that runs it
    (127.0.0.2 here), as the crashed SharedJobCluster's job did, not the
    scheduler (127.0.0.1) its journal names."""
    with (
        running_node(
            tmp_path / "node", "--host", "127.0.0.2", cpus=2, name="behind"
        ) as node,
        SchedulerProcess(tmp_path, [f"127.0.0.2:{node.port}"], node.secret) as sched,
    ):
        journal, _ = _endless_jobs_left(sched, users["alice"], tmp_path)
        jobs = recover_jobs(str(journal), secret_file=str(users["alice"]), timeout=1)
        _recovered_terminated(journal, users["alice"])
    assert [(job.status, job.ip_addr) for job in jobs] == [
        (JobStatus.Running, "127.0.0.2")
    ] * 2, [(job.status, job.ip_addr, job.exception) for job in jobs]
