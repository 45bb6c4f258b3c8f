"""What a job writes below Python (``os.system``, a C library's ``printf``) is in its
``stdout`` and ``stderr``, in its place among the job's prints, and nowhere else.

Real ``python -m nodeserver`` processes and a real client; one CPU, so the jobs run
on the same worker, one after the other.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dispynb import JobCluster
from dispynb.jobenv import OUTPUT_OPTION
from dispynb.limits import DEFAULT_MAX_OUTPUT
from nodeserver import fdoutput
from nodeserver.fdoutput import _anonymous_file
from nodeserver.jobrunner import _Merged
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow


def below_python(n: int) -> list[str]:
    """Print from Python, from a shell ``os.system`` starts (stdout and stderr), and
    from C (``printf`` with no newline, left in C's buffer): in that order."""
    import ctypes
    import os
    import sys

    print(f"python {n}")
    os.system(f"echo shell {n}; echo shell err {n} >&2")
    print(f"python err {n}", file=sys.stderr)
    ctypes.CDLL(None).printf(f"C {n}".encode())
    print(f"\npython again {n}")
    return os.listdir(".")


@pytest.mark.parametrize("max_output", [DEFAULT_MAX_OUTPUT, None])
def test_output_below_python_is_the_jobs_in_order(
    tmp_path: Path, max_output: int | None
) -> None:
    """It went to the node's own stdout and stderr (in a notebook using ``%dispy
    local``, into whatever cell ran then, unlabelled): never in ``job.stdout``."""
    with running_node(tmp_path / "node", cpus=1) as node:
        with JobCluster(
            below_python,
            nodes=[node.spec],
            secret=node.secret,
            max_output_size=max_output,
        ) as cluster:
            jobs = []
            for n in range(2):  # on the node's one worker, one after the other
                job = cluster.submit(n)
                # The files are the worker's, not the job's (they were listed).
                assert job() == [], (job.status, job.exception, job.result)
                jobs.append(job)
        log = node.log_text()
    for n, job in enumerate(jobs):
        assert job.stdout == f"python {n}\nshell {n}\nC {n}\npython again {n}\n", (
            job.stdout
        )
        assert job.stderr == f"shell err {n}\npython err {n}\n", job.stderr
    assert "shell" not in log and "C 0" not in log, log


def flood(size: int) -> str:
    """Write ``size`` characters below Python, then print a line."""
    import os

    os.system(f"head -c {size} /dev/zero | tr '\\0' x")
    print("after")
    return "done"


def test_output_below_python_is_kept_to_max_output(tmp_path: Path) -> None:
    """A flood below Python is cut at ``max_output_size`` as a Python flood is,
    with the line saying how much was dropped (not read into memory whole)."""
    with (
        running_node(tmp_path / "node", cpus=1) as node,
        JobCluster(
            flood, nodes=[node.spec], secret=node.secret, max_output_size=1000
        ) as cluster,
    ):
        job = cluster.submit(5_000_000)
        assert job() == "done", (job.status, job.exception)
    kept, _, note = job.stdout.partition("\n")
    assert kept == "x" * 1000, job.stdout[:2000]
    assert note == (
        "[dispynb: 4999006 more characters of stdout dropped: a job keeps 1000 "
        f"({OUTPUT_OPTION})]\n"
    ), note


def quick_below_python(n: int) -> int:
    """Jobs of microseconds: even ones write below Python (``os.write``), odd ones
    print from Python."""
    import os

    if n % 2 == 0:
        os.write(1, b"below %d\n" % n)
    else:
        print(f"python {n}")
    return n


def test_output_below_python_of_jobs_of_microseconds_is_their_own(
    tmp_path: Path,
) -> None:
    """A burst of jobs too short for the check that the processes a job left are
    gone: what each wrote below Python is in its own stdout. Before, a job under 50
    us left it in the file, and the next job took it in (396 of 400 jobs had
    another's output or none)."""
    with (
        running_node(tmp_path / "node", cpus=1) as node,
        JobCluster(quick_below_python, nodes=[node.spec], secret=node.secret) as c,
    ):
        jobs = [(n, c.submit(n)) for n in range(200)]
        c.wait()
    wrong = [
        (n, job.stdout)
        for n, job in jobs
        if job.stdout != (f"below {n}\n" if n % 2 == 0 else f"python {n}\n")
    ]
    assert not wrong, wrong[:6]


def last_words(n: int) -> int:
    """Write below Python, then crash the worker (job 0) or return (job 1)."""
    import ctypes
    import os

    print("lost with the worker")
    os.system(f"echo shell {n}; echo shell err {n} >&2")
    os.write(1, f"last words {n}\n".encode())
    if n == 0:
        ctypes.string_at(0)  # SIGSEGV
    return n


def test_output_below_python_of_a_job_whose_worker_died_is_in_its_report(
    tmp_path: Path,
) -> None:
    """A C library's last words before it crashed went to the node's console; in
    the worker's files, they went with it. The node holds the files too and puts
    what they hold in the job's report; the next job, on a new worker, has only
    its own."""
    with (
        running_node(tmp_path / "node", cpus=1) as node,
        JobCluster(last_words, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        crashed = cluster.submit(0)
        crashed()
        after = cluster.submit(1)
        assert after() == 1, (after.status, after.exception)
    assert "SIGSEGV" in str(crashed.exception), crashed.exception
    assert crashed.stdout == "shell 0\nlast words 0\n", crashed.stdout
    assert crashed.stderr == "shell err 0\n", crashed.stderr
    assert after.stdout == "lost with the worker\nshell 1\nlast words 1\n", after.stdout


def test_a_workers_output_file_never_has_a_name_in_the_jobs_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is made in the computation's directory, where the jobs run: a job
    listing it while another worker started saw '.dispynb-output-...' between its
    creation and its unlink (tests/sharedsched/test_dest_path.py met it)."""
    listings: list[list[str]] = []
    real_unlink = os.unlink

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        listings.append(sorted(os.listdir(tmp_path)))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    fd = _anonymous_file(str(tmp_path))
    try:
        os.write(fd, b"below Python\n")
        assert os.fstat(fd).st_size == len(b"below Python\n")
        assert os.listdir(tmp_path) == []
    finally:
        os.close(fd)
    assert all(listing == [] for listing in listings), listings


def test_threads_printing_at_once_take_what_is_pending_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads of a job start a line at once while output below Python waits:
    each read it (os.pread lets the other run) before either counted it taken,
    and it was in the job's output twice. In this process: its descriptors 1 and
    2 are the files while the FdOutput lives."""
    below = fdoutput.FdOutput.adopt(
        _anonymous_file(str(tmp_path)), _anonymous_file(str(tmp_path))
    )
    assert below is not None
    out, err = _Merged(), _Merged()
    try:
        below.begin(out, err)  # type: ignore[arg-type]
        os.write(1, b"below\n")
        both = threading.Barrier(2, timeout=2)
        real = os.pread

        def pread(fd: int, size: int, offset: int) -> bytes:
            data = real(fd, size, offset)
            with contextlib.suppress(threading.BrokenBarrierError):
                both.wait()  # the other thread reads meanwhile, if it can
            return data

        monkeypatch.setattr(fdoutput.os, "pread", pread)
        printers = [
            threading.Thread(target=out.write, args=(f"line {n}\n",)) for n in (0, 1)
        ]
        for printer in printers:
            printer.start()
        for printer in printers:
            printer.join()
        monkeypatch.undo()
        below.end(out, err)  # type: ignore[arg-type]
    finally:
        below.close()
    assert out.getvalue().count("below\n") == 1, out.getvalue()


def flood_below_python(megabytes: int) -> tuple[int, int]:
    """Write ``megabytes`` MiB below Python with no Python print in between, then
    wait (at most 20 s) until the file behind descriptor 1 takes under 8 MiB of
    disk: ``(bytes written, bytes of disk it took at the end)``."""
    import os
    import time

    def held() -> int:
        return os.fstat(1).st_blocks * 512

    os.system(f"head -c {megabytes << 20} /dev/zero | tr '\\0' x")
    deadline = time.monotonic() + 20
    while held() >= 8 << 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    return megabytes << 20, held()


def test_a_job_flooding_below_python_takes_little_of_the_nodes_disk(
    tmp_path: Path,
) -> None:
    """``yes`` or a chatty solver in a job: its output below Python went to a file
    of its worker until the job returned, 200 MiB of the node's disk for 200 MiB
    written. The worker takes it into the job's output (kept to max_output, the
    rest counted) once it passes 1 MiB, and frees the file's blocks, losing
    none of it (a truncation lost what was appended meanwhile)."""
    with (
        running_node(tmp_path / "node", cpus=1) as node,
        JobCluster(
            flood_below_python,
            nodes=[node.spec],
            secret=node.secret,
            max_output_size=1000,
        ) as cluster,
    ):
        job = cluster.submit(200)
        written, held = job()
    assert held < 8 << 20, (written, held)
    kept, _, note = job.stdout.partition("\n")
    assert kept == "x" * 1000, job.stdout[:2000]
    assert note == (
        f"[dispynb: {written - 1000} more characters of stdout dropped: a job keeps "
        f"1000 ({OUTPUT_OPTION})]\n"
    ), note


def _wakeups(thread: threading.Thread) -> int:
    """How many times ``thread`` went off its CPU of its own accord (waits ended)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    for line in status.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError(status)


def test_an_idle_workers_output_thread_does_not_wake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread that spills a flooding job's output looked every SPILL_EVERY s,
    job or not: 4 wake-ups a second for every idle worker of every node. It waits
    for a job now, and still spills a job's output while the job runs. In this
    process, looking every 10 ms: 20 looks in the 0.2 s watched before."""
    monkeypatch.setattr(fdoutput, "SPILL_EVERY", 0.01)
    monkeypatch.setattr(fdoutput, "SPILL_AT", 1024)
    below = fdoutput.FdOutput.adopt(
        _anonymous_file(str(tmp_path)), _anonymous_file(str(tmp_path))
    )
    assert below is not None
    spiller = below._spiller
    watch = threading.Event()
    try:
        assert watch.wait(0.05) is False  # the thread settles
        before = _wakeups(spiller)
        watch.wait(0.2)
        idle = _wakeups(spiller) - before
        out, err = _Merged(), _Merged()
        below.begin(out, err)  # type: ignore[arg-type]
        os.write(1, b"y" * 4096)
        for _ in range(500):  # at most 5 s for the thread to take it
            if os.fstat(1).st_blocks == 0:
                break
            watch.wait(0.01)
        held = os.fstat(1).st_blocks
        below.end(out, err)  # type: ignore[arg-type]
    finally:
        below.close()
    assert idle <= 1, idle
    assert held == 0
    assert out.getvalue() == "y" * 4096


def test_jobs_of_microseconds_do_not_wake_the_output_thread_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Woken at each job's start, the thread found the job ended already and
    parked again: one wake-up per job, a third more CPU per job in W1. It parks
    only after a whole SPILL_EVERY without a job now. In this process: jobs begun
    and ended for 0.3 s, the thread looking every 0.1 s."""
    monkeypatch.setattr(fdoutput, "SPILL_EVERY", 0.1)
    below = fdoutput.FdOutput.adopt(
        _anonymous_file(str(tmp_path)), _anonymous_file(str(tmp_path))
    )
    assert below is not None
    spiller = below._spiller
    watch = threading.Event()
    jobs = 0
    try:
        for _ in range(500):  # at most 5 s for the thread to park
            if spiller.parked:
                break
            watch.wait(0.01)
        before = _wakeups(spiller)
        out, err = _Merged(), _Merged()
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            below.begin(out, err)  # type: ignore[arg-type]
            below.end(out, err)  # type: ignore[arg-type]
            jobs += 1
        woken = _wakeups(spiller) - before
    finally:
        below.close()
    assert jobs > 1000, jobs
    # Three looks, each waiting a few times for the GIL the jobs' loop holds
    # (37,656 wake-ups for 32,609 jobs before).
    assert woken <= 100, (woken, jobs)
