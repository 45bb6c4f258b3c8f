"""``dispy_send_file`` tells the job the truth: 0 once the client wrote the file, -1
(and why, on the job's stderr and in the client's log) when the client's disk
refuses it. Real nodes; the client whose disk refuses is a real process under a
file size limit (RLIMIT_FSIZE, as ``ulimit -f`` sets), which binds root too."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster, LocalCluster
from tests.jobs import WAIT, wait_until
from tests.nodeproc import node_env, running_node

pytestmark = pytest.mark.slow

#: Bytes the refusing client may write to a file.
FSIZE = 64 * 1024


def send(name: str, size: int) -> tuple[int, int]:
    """Write ``size`` bytes to ``name`` and send it; (what dispy_send_file returned,
    its size)."""
    with open(name, "wb") as handle:
        handle.write(bytes(range(256)) * (size // 256))
    return dispy_send_file(name), size  # type: ignore[name-defined]  # noqa: F821


#: A client (its own process) that runs `send` for a small and a large file on the
#: node, and prints each job's result and stderr as JSON.
CLIENT = """
import json, sys
import dispynb as dispy
from tests.api.test_sent_files import send

node, secret, files_dir = sys.argv[1:4]
with dispy.JobCluster(send, nodes=[node], secret=secret, files_dir=files_dir) as c:
    jobs = [c.submit("small.bin", 4096), c.submit("large.bin", 1024 * 1024)]
    c.wait(timeout=60)
print(json.dumps([[j.status, j.result, j.stderr, j.exception] for j in jobs]))
"""


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE, FSIZE))


def test_a_file_the_clients_disk_refuses_returns_minus_one_and_says_why(
    tmp_path: Path,
) -> None:
    received = tmp_path / "received"
    received.mkdir()
    with running_node(tmp_path / "node") as node:
        # The node runs without the limit: only the client's writes are refused.
        proc = subprocess.run(
            [sys.executable, "-c", CLIENT, node.spec, node.secret, str(received)],
            capture_output=True,
            text=True,
            timeout=120,
            env=node_env(),
            cwd=tmp_path,  # its recovery journal goes there
            preexec_fn=_limit_file_size,
        )
    assert proc.returncode == 0, proc.stderr
    (small, large) = json.loads(proc.stdout.splitlines()[-1])
    assert small[:2] == [int(DispyJob.Finished), [0, 4096]], small
    assert (received / "small.bin").read_bytes() == bytes(range(256)) * 16
    assert large[:2] == [int(DispyJob.Finished), [-1, 1024 * 1024]], large
    # The job says why, and how to fix it; so does the client's log.
    assert "'large.bin' not sent" in large[2]
    assert "File too large" in large[2] and "ulimit -f" in large[2], large[2]
    assert "File too large" in proc.stderr and "large.bin" in proc.stderr
    assert not (received / "large.bin").exists()
    assert not [p for p in received.iterdir() if p.name not in {"small.bin"}]


def test_a_destination_that_cannot_be_written_returns_minus_one(
    local: LocalCluster, tmp_path: Path
) -> None:
    """The file goes to ``sub/out.bin`` where the client's ``sub`` is a file."""
    (tmp_path / "sub").write_text("a file where the job's folder should be")

    def nested(size: int) -> tuple[int, int]:
        import os

        os.makedirs("sub", exist_ok=True)
        with open("sub/out.bin", "wb") as handle:
            handle.write(b"x" * size)
        return dispy_send_file("sub/out.bin"), size  # type: ignore[name-defined]  # noqa: F821

    with JobCluster(nested, nodes=local, files_dir=str(tmp_path)) as cluster:
        job = cluster.submit(1024)
        assert job.wait(timeout=WAIT)
    assert job.result == (-1, 1024), (job.status, job.exception)
    assert "'sub/out.bin' not sent" in job.stderr, job.stderr
    assert "is not a directory" in job.stderr, job.stderr


def test_a_job_that_stops_waiting_gets_minus_one_and_its_next_file_goes(
    local: LocalCluster, tmp_path: Path
) -> None:
    """timeout=0 gives up before the client could answer; the late answer does
    not confuse the next call, which waits for its own."""

    def twice(n: int, size: int) -> tuple[int, int, str]:
        # Jobs share their directory (as in dispy): each writes its own names.
        with open(f"a{n}.bin", "wb") as handle:
            handle.write(b"a" * size)
        first = dispy_send_file(f"a{n}.bin", timeout=0)  # type: ignore[name-defined]  # noqa: F821
        with open(f"b{n}.bin", "wb") as handle:
            handle.write(b"b" * size)
        second = dispy_send_file(f"b{n}.bin")  # type: ignore[name-defined]  # noqa: F821
        return first, second, "done"

    with JobCluster(twice, nodes=local, files_dir=str(tmp_path)) as cluster:
        jobs = [cluster.submit(n, 1000) for n in range(4)]
        assert cluster.wait(timeout=WAIT)
    for n, job in enumerate(jobs):
        assert job.result == (-1, 0, "done"), (job.status, job.exception)
        assert "did not confirm it within 0" in job.stderr
        assert (tmp_path / f"b{n}.bin").read_bytes() == b"b" * 1000


def test_a_long_timeout_waits_for_the_answer(
    local: LocalCluster, tmp_path: Path
) -> None:
    """A timeout longer than a poll can wait at once (about 24.8 days in ms, or
    infinity) waits for the client's answer like None, instead of raising
    OverflowError out of dispy_send_file."""

    def patient(n: int, timeout: float) -> int:
        # Jobs share their directory (as in dispy): each writes its own name.
        with open(f"p{n}.bin", "wb") as handle:
            handle.write(b"p" * 100)
        return dispy_send_file(f"p{n}.bin", timeout=timeout)  # type: ignore[name-defined]  # noqa: F821

    timeouts = (30 * 86400, 1e300, float("inf"))
    with JobCluster(patient, nodes=local, files_dir=str(tmp_path)) as cluster:
        jobs = [cluster.submit(n, t) for n, t in enumerate(timeouts)]
        assert cluster.wait(timeout=WAIT)
    assert [(job.status, job.result) for job in jobs] == [(DispyJob.Finished, 0)] * 3, [
        job.exception for job in jobs
    ]
    for n in range(len(timeouts)):
        assert (tmp_path / f"p{n}.bin").read_bytes() == b"p" * 100


def send_from_a_child(n: int, marks: str) -> tuple[int, int]:
    """Job `FORKING` says it started, waits for ``go``, then forks a process that
    sends ``child.txt``: (n, its exit code); the others return at once."""
    import multiprocessing
    import os
    import time

    if n != FORKING:
        return n, 0
    open(os.path.join(marks, "started"), "w").close()
    while not os.path.exists(os.path.join(marks, "go")):
        time.sleep(0.01)

    def child() -> None:
        with open("child.txt", "w") as handle:
            handle.write("from the child of a job")
        os._exit(dispy_send_file("child.txt") + 10)  # type: ignore[name-defined]  # noqa: F821

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join()
    return n, process.exitcode or 0


#: The job of `send_from_a_child` that forks.
FORKING = 20


def test_a_process_a_job_started_sends_a_file_and_reads_no_messages_of_its_worker(
    local1: LocalCluster, tmp_path: Path
) -> None:
    """The child gets 0 without the client's answer: only the worker may read its
    messages. (A child that did took the jobs sent ahead to the worker while the
    job ran, and they were lost: the wait below lets them reach its socket.)"""
    marks = tmp_path / "marks"
    marks.mkdir()
    with JobCluster(
        send_from_a_child, nodes=local1, files_dir=str(tmp_path)
    ) as cluster:
        jobs = [cluster.submit(n, str(marks)) for n in range(FORKING + 1)]
        wait_until(lambda: (marks / "started").exists())
        jobs += [cluster.submit(n, str(marks)) for n in range(FORKING + 1, 40)]
        time.sleep(0.5)  # not for the outcome: only to let the failure show
        (marks / "go").touch()
        assert cluster.wait(timeout=WAIT), [job.status for job in jobs]
    assert [job.result for job in jobs] == [
        (n, 10 if n == FORKING else 0) for n in range(40)
    ]
    assert (tmp_path / "child.txt").read_text() == "from the child of a job"


def test_a_thread_left_waiting_by_its_job_does_not_stall_the_worker(
    local1: LocalCluster, tmp_path: Path
) -> None:
    """A job starts a thread that sends a file, and returns while the thread waits
    for the client's answer. The thread read the worker's socket on, with the
    worker loop: when the loop took the answer, the thread took the next job's
    Run, and that job never started (on one CPU, within a few rounds). Now the
    thread gives up once its job has returned, and the loop reads alone."""

    def leave_a_sender(n: int) -> str:
        import os
        import threading

        if n % 2:
            return f"plain {n}"
        with open(f"big-{n}.bin", "wb") as handle:
            handle.write(b"x" * (8 << 20))

        def send(name: str) -> None:
            os.setpriority(os.PRIO_PROCESS, 0, 19)  # this thread: slow to wake
            dispy_send_file(name)  # type: ignore[name-defined]  # noqa: F821

        from nodeserver.jobapi import CONTEXT

        # Return once the thread sent the file (past its check that its job runs):
        # the thread then waits for the answer after this returned. Returning as
        # soon as it held the answer lock let a loaded machine return before that
        # check, the thread then giving up unsent (by design).
        sent = threading.Event()
        send_now = CONTEXT.send

        def send_and_tell(message: object, buffers: list[object]) -> None:
            send_now(message, buffers)
            sent.set()

        CONTEXT.send = send_and_tell  # type: ignore[method-assign]
        try:
            threading.Thread(target=send, args=(f"big-{n}.bin",)).start()
            assert sent.wait(30), "the thread did not send its file"
        finally:
            del CONTEXT.send  # the method again
        return f"sender {n}"

    with JobCluster(leave_a_sender, nodes=local1, files_dir=str(tmp_path)) as cluster:
        for n in range(0, 40, 2):
            sender = cluster.submit(n)
            assert sender.wait(timeout=WAIT), sender.status
            time.sleep(0.1)  # the answer comes while the worker waits for work
            plain = cluster.submit(n + 1)
            assert plain.wait(timeout=WAIT), f"job {n + 1} never ran ({plain.status})"
            assert plain.result == f"plain {n + 1}", plain.exception
    assert len(list(tmp_path.glob("big-*.bin"))) == 20


def leave_a_late_sender(n: int, marks: str) -> str:
    """Job 0 starts a thread and returns at once; the thread waits until job 1
    runs (on the same worker: one CPU), then sends a file and a provisional
    result and notes what each call returned. Job 1 waits for that note."""
    import json
    import os
    import pathlib
    import threading
    import time

    here = pathlib.Path(marks)
    if n == 0:

        def late() -> None:
            deadline = time.monotonic() + 30
            while not (here / "job-1-runs").exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            with open("late.txt", "w") as handle:
                handle.write("from a thread of job 0")
            sent = dispy_send_file("late.txt")  # type: ignore[name-defined]  # noqa: F821
            told = dispy_provisional_result("from a thread of job 0")  # type: ignore[name-defined]  # noqa: F821
            (here / "noted.tmp").write_text(json.dumps([sent, told]))
            os.rename(here / "noted.tmp", here / "noted")

        threading.Thread(target=late, daemon=True).start()
        return "job 0"
    (here / "job-1-runs").touch()
    deadline = time.monotonic() + 30
    while not (here / "noted").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    return "job 1"


def test_a_thread_of_a_job_that_returned_sends_nothing_as_the_next_job(
    tmp_path: Path,
) -> None:
    """A thread that job 0 left running sends a file and a provisional result
    while its worker runs job 1. Both went out as job 1's (the worker's running
    job): the file saved by the client, the provisional result shown as job 1's.
    Now the worker knows the thread is job 0's, which has returned: neither is
    sent, both calls return -1, and job 1's stderr does not say so."""
    marks, received = tmp_path / "marks", tmp_path / "received"
    marks.mkdir()
    received.mkdir()
    provisional: list[object] = []

    def job_status(job: DispyJob) -> None:
        if job.status == DispyJob.ProvisionalResult:
            provisional.append(job.result)

    with (
        running_node(tmp_path / "node", cpus=1) as node,
        JobCluster(
            leave_a_late_sender,
            nodes=[node.spec],
            secret=node.secret,
            files_dir=str(received),
            job_status=job_status,
        ) as cluster,
    ):
        first = cluster.submit(0, str(marks))
        assert first() == "job 0", (first.status, first.exception)
        second = cluster.submit(1, str(marks))
        assert second() == "job 1", (second.status, second.exception)
        noted = json.loads((marks / "noted").read_text())
    assert noted == [-1, -1], noted
    assert provisional == []
    assert not (received / "late.txt").exists()
    assert "not sent" not in second.stderr, second.stderr  # not job 1's to say
