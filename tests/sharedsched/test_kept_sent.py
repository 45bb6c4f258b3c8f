"""Files and provisional results that jobs send while their client is away (killed)
are kept by the scheduler, and `recover_jobs` in a new process gets them: the files
saved under its ``files_dir``, a job still running showing its latest provisional
result. The jobs themselves learned that the client did not write their files."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from dispynb import LocalCluster, recover_jobs
from dispynb.job import DispyJob, JobStatus
from tests.api.test_recovery_sent import SENDING_JOB
from tests.jobs import wait_until
from tests.sharedsched.harness import SchedulerProcess, start_client
from tests.sharedsched.test_kept import _scheduler

pytestmark = pytest.mark.slow

#: A client of `SENDING_JOB` (two jobs that send a file and a provisional result
#: once their client is killed) through a scheduler, with a journal.
CLIENT = (
    """
import sys, time
from dispynb import SharedJobCluster

"""
    + SENDING_JOB
    + """
address, credential, journal, marks, go, release = sys.argv[1:]
cluster = SharedJobCluster(
    job, scheduler_host=address, secret_file=credential, recover_file=journal
)
jobs = [cluster.submit(n, marks, go, release) for n in range(2)]
print("submitted", flush=True)
time.sleep(300)
"""
)


def run_and_kill(
    scheduler: SchedulerProcess,
    script: str,
    credential: str,
    *args: str,
    cwd: Path,
    jobs: int = 2,
    stopped: Callable[[], None] | None = None,
) -> None:
    """Run client ``script`` until it submitted its ``jobs`` and each started (a
    ``started*`` mark in folder ``args[1]``), kill it (SIGKILL), wait until the
    scheduler knows. With ``stopped``: the client is stopped (SIGSTOP, it reads
    nothing more) and ``stopped()`` called before it is killed."""
    marks = Path(args[1])
    proc = start_client(
        script, scheduler.address, credential, *args, cwd=cwd, name="away"
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "submitted", proc.communicate()
        wait_until(lambda: len(list(marks.glob("started*"))) == jobs)
        if stopped is not None:
            os.killpg(proc.pid, signal.SIGSTOP)
            stopped()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=20)
    scheduler.wait_for_log("client gone", timeout=60)


def test_files_and_provisional_results_sent_while_away_are_recovered(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    journal, marks, received = (
        tmp_path / "j.journal",
        tmp_path / "marks",
        tmp_path / "in",
    )
    go, release = tmp_path / "go", tmp_path / "release"
    marks.mkdir()
    received.mkdir()
    credential = str(users["alice"])
    run_and_kill(
        scheduler, CLIENT, credential, str(journal), str(marks), str(go),
        str(release), cwd=tmp_path,
    )  # fmt: skip
    go.touch()
    try:
        wait_until(lambda: len(list(marks.glob("sent-*"))) == 2)
        for n in range(2):
            sent, said = (marks / f"sent-{n}").read_text().split(" ", 1)
            assert sent == "-1", said  # the client did not write it (yet)
            assert "the client is away" in said, said
            assert "the scheduler keeps it for the client's recover_jobs" in said
        jobs = recover_jobs(
            str(journal), secret_file=credential, timeout=3, files_dir=str(received)
        )
    finally:
        since = len(scheduler.log_text())
        release.touch()
    assert [job.status for job in jobs] == [
        JobStatus.Finished,
        JobStatus.ProvisionalResult,
    ], [job.exception for job in jobs]
    assert jobs[0].result == 0
    assert jobs[1].result == "half of 1"  # still running: its latest provisional
    for n in range(2):
        assert (received / f"out-{n}.txt").read_text() == f"file of job {n}"
    # The rest comes with the next call, once job 1 ended: kept, though the
    # client that came back for its computation went away before that.
    scheduler.wait_for_log("no job of it runs, 0 wait", timeout=60, since=since)
    again = recover_jobs(
        str(journal), secret_file=credential, timeout=60, files_dir=str(received)
    )
    assert [(job.status, job.result) for job in again] == [
        (JobStatus.Finished, 0),
        (JobStatus.Finished, 10),
    ], [job.exception for job in again]


#: One job that waits for ``go``, sends a 2 MiB file and notes what
#: dispy_send_file returned and said.
LARGE_CLIENT = """
import sys, time
from dispynb import SharedJobCluster

def job(marks, go):
    import contextlib, io, os, time
    open(os.path.join(marks, "started"), "w").close()
    while not os.path.exists(go):
        time.sleep(0.02)
    with open("large.bin", "wb") as handle:
        handle.write(b"x" * (2 << 20))
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        sent = dispy_send_file("large.bin")
    # Written whole, then renamed: the test reads it once it exists.
    mark = "sent"
    with open(os.path.join(marks, "~" + mark), "w") as handle:
        handle.write("%d %s" % (sent, said.getvalue()))
    os.replace(os.path.join(marks, "~" + mark), os.path.join(marks, mark))
    return sent

address, credential, journal, marks, go = sys.argv[1:]
cluster = SharedJobCluster(
    job, scheduler_host=address, secret_file=credential, recover_file=journal
)
cluster.submit(marks, go)
print("submitted", flush=True)
time.sleep(300)
"""


@pytest.fixture
def small_quota(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> Iterator[SchedulerProcess]:
    """A scheduler that keeps 1 MiB per computation at most."""
    yield from _scheduler(tmp_path, nodes, "--max_kept", "1M")


def test_a_file_over_the_kept_quota_is_not_said_to_be_kept(
    small_quota: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    marks, go = tmp_path / "marks", tmp_path / "go"
    marks.mkdir()
    run_and_kill(
        small_quota, LARGE_CLIENT, str(users["alice"]), str(tmp_path / "j.journal"),
        str(marks), str(go), cwd=tmp_path, jobs=1,
    )  # fmt: skip
    go.touch()
    wait_until(lambda: (marks / "sent").exists())
    sent, said = (marks / "sent").read_text().split(" ", 1)
    assert sent == "-1" and "the client is away" in said, said
    assert "keeps it" not in said, said  # over --max_kept: it was not kept


def test_a_file_the_client_got_but_over_the_kept_quota_is_not_said_to_be_kept(
    small_quota: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """The 2 MiB file reaches the client (stopped: it never answers), which then
    dies: the file was not kept (over --max_kept 1M, logged), and its job is told
    so (before: 'the scheduler keeps it', as for a file within the quota)."""
    marks, go = tmp_path / "marks", tmp_path / "go"
    marks.mkdir()

    def send_while_stopped() -> None:
        go.touch()
        small_quota.wait_for_log("a file a job sent was not kept", timeout=60)

    run_and_kill(
        small_quota, LARGE_CLIENT, str(users["alice"]), str(tmp_path / "j.journal"),
        str(marks), str(go), cwd=tmp_path, jobs=1, stopped=send_while_stopped,
    )  # fmt: skip
    wait_until(lambda: (marks / "sent").exists())
    sent, said = (marks / "sent").read_text().split(" ", 1)
    assert sent == "-1" and "the client is away" in said, said
    assert "keeps it" not in said, said


#: Job 0 sends a file once its client is gone (the scheduler keeps it); job 1 waits
#: until `recover_jobs` saved that one (so it is attached), then sends its own and
#: returns what dispy_send_file returned.
LIVE = """
import sys, time
from dispynb import SharedJobCluster

def job(n, marks, go, received, size):
    import os, time
    open(os.path.join(marks, "started-%d" % n), "w").close()
    wait_for = go if n == 0 else os.path.join(received, "out-0.txt")
    while not os.path.exists(wait_for):
        time.sleep(0.02)
    with open("out-%d.txt" % n, "w") as handle:
        handle.write(("file of job %d" % n).ljust(size if n else 0, "."))
    sent = dispy_send_file("out-%d.txt" % n)
    open(os.path.join(marks, "sent-%d" % n), "w").close()
    return sent

address, credential, journal, marks, go, received, size = sys.argv[1:]
cluster = SharedJobCluster(
    job, scheduler_host=address, secret_file=credential, recover_file=journal
)
jobs = [cluster.submit(n, marks, go, received, int(size)) for n in range(2)]
print("submitted", flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("size", [0, 256 * 1024])
def test_a_file_sent_while_recover_jobs_waits_is_answered(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path, size: int
) -> None:
    """A job that sends a file while `recover_jobs` is attached (waiting for it to
    end) is answered: recover_jobs saves the file and says so, the job's
    dispy_send_file returns 0 and the job ends; a file over recover_jobs's
    max_message_size is left out, and the job told (-1). recover_jobs never
    answered, nor the scheduler for a file it left out: the job waited for it and
    recover_jobs for the job, until its timeout."""
    journal, marks, received = (
        tmp_path / "j.journal",
        tmp_path / "marks",
        tmp_path / "in",
    )
    go = tmp_path / "go"
    marks.mkdir()
    received.mkdir()
    credential = str(users["alice"])
    run_and_kill(
        scheduler, LIVE, credential, str(journal), str(marks), str(go),
        str(received), str(size), cwd=tmp_path,
    )  # fmt: skip
    go.touch()
    wait_until(lambda: (marks / "sent-0").exists())
    jobs = recover_jobs(
        str(journal),
        secret_file=credential,
        timeout=30,
        files_dir=str(received),
        max_message_size=128 * 1024,
    )
    assert [(job.status, job.result) for job in jobs] == [
        (JobStatus.Finished, -1),  # sent while nobody could save it: kept
        (JobStatus.Finished, -1 if size else 0),
    ], [job.exception for job in jobs]
    assert (received / "out-0.txt").read_text() == "file of job 0"
    if size:
        assert not (received / "out-1.txt").exists()
        assert "over the max_message_size" in jobs[1].stderr, jobs[1].stderr
    else:
        assert (received / "out-1.txt").read_text() == "file of job 1"


def _recovered_from_zombie(
    scheduler: SchedulerProcess,
    credential: str,
    tmp_path: Path,
    sent: Callable[[int], None],
) -> list[DispyJob]:
    """Run `LARGE_CLIENT` until its job started, stop it (SIGSTOP: connected but
    silent, a zombie), let its job send its file, ``sent(pid)`` until the file
    reached the scheduler; then `recover_jobs` (files under ``tmp_path / 'in'``)
    takes the computation from the zombie, and the zombie is killed."""
    journal, marks, go = tmp_path / "j.journal", tmp_path / "marks", tmp_path / "go"
    marks.mkdir()
    (tmp_path / "in").mkdir()
    proc = start_client(
        LARGE_CLIENT, scheduler.address, credential, str(journal), str(marks),
        str(go), cwd=tmp_path, name="zombie",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "submitted", proc.communicate()
        wait_until(lambda: (marks / "started").exists())
        os.killpg(proc.pid, signal.SIGSTOP)
        go.touch()
        sent(proc.pid)
        jobs = recover_jobs(
            str(journal),
            secret_file=credential,
            timeout=30,
            files_dir=str(tmp_path / "in"),
        )
        assert proc.poll() is None  # the zombie was connected all along
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=20)
    return jobs


def test_a_file_a_zombie_client_never_answered_is_answered_when_recover_jobs_takes_over(
    small_quota: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """The 2 MiB file reaches the client, a zombie that never answers; the
    scheduler did not keep it (over --max_kept 1M). `recover_jobs` in another
    process takes the computation from the zombie: the job is told at once that
    the file was not saved, nor kept, and ends (before: it waited in
    dispy_send_file, and recover_jobs for it)."""
    jobs = _recovered_from_zombie(
        small_quota,
        str(users["alice"]),
        tmp_path,
        lambda _: small_quota.wait_for_log("a file a job sent was not kept", 1, 60),
    )
    assert [(job.status, job.result) for job in jobs] == [(JobStatus.Finished, -1)], [
        job.exception for job in jobs
    ]
    sent, said = (tmp_path / "marks" / "sent").read_text().split(" ", 1)
    assert sent == "-1" and "recover_jobs" in said, said
    assert "keeps it" not in said, said


def _queued_towards(pid: int) -> int:
    """Bytes on their way to process ``pid`` over TCP: sent to it and not read yet
    (its peers' send queues and its own receive queues, from /proc/net/tcp)."""
    ports = {
        conn.laddr.port for conn in psutil.Process(pid).net_connections(kind="tcp")
    }
    queued = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                local, remote, _state, queues = line.split()[1:5]
                tx, rx = (int(q, 16) for q in queues.split(":"))
                if int(local.rsplit(":", 1)[1], 16) in ports:
                    queued += rx
                elif int(remote.rsplit(":", 1)[1], 16) in ports:
                    queued += tx
    return queued


def test_a_file_a_zombie_client_never_answered_goes_to_recover_jobs_that_takes_over(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """The 2 MiB file reaches the zombie and is kept by the scheduler (within
    --max_kept): `recover_jobs` in another process takes the computation, gets the
    file with what was kept, writes it and answers the job, whose dispy_send_file
    returns 0."""

    def sent_to_zombie(pid: int) -> None:
        # Over 1 MiB on its way to the zombie: nothing else sent to it is as large.
        wait_until(lambda: _queued_towards(pid) > 1 << 20)

    jobs = _recovered_from_zombie(
        scheduler, str(users["alice"]), tmp_path, sent_to_zombie
    )
    assert [(job.status, job.result) for job in jobs] == [(JobStatus.Finished, 0)], [
        job.exception for job in jobs
    ]
    assert (tmp_path / "in" / "large.bin").stat().st_size == 2 << 20
    assert (tmp_path / "marks" / "sent").read_text() == "0 "
