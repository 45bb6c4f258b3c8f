"""dispynb on a real Ray cluster: what jobs print and log goes to each job's own
stdout and stderr (bounded by max_output_size), and a program opening clusters
prints no Ray error. Runs as test_ray.py does (see its docstring)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from dispynb import JobCluster
from dispynb.backends.ray import RayEngine
from dispynb.job import DispyJob, JobStatus
from dispynb.jobenv import OUTPUT_OPTION
from tests.backends.rayhead import RayHead
from tests.backends.raywork import (
    WAIT,
    wait_for,
)

#: Ray's driver keeps its connections to the actors' workers (its cache).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.usefixtures("allow_engine_sockets"),
]


# -- computations (by value, as from a notebook) ------------------------------------


def log_a_line(n: int) -> int:
    """Sets up logging as a script does, once per actor (its handler keeps the
    stderr it finds: that job's), and logs a line."""

    root = logging.getLogger()
    if not getattr(root, "set_up_by_a_job", False):
        logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
        root.set_up_by_a_job = True  # type: ignore[attr-defined]
    logging.getLogger("job").info("job %d logs", n)
    return n


def leave_a_printer(n: int, marks: str) -> tuple[int, int, bool]:
    """The first job on an actor starts a thread and returns; the thread waits for
    a later job on its actor, then prints, tries to send a provisional result and
    notes what that returned. A later job prints, says it runs and returns once
    the note is there. Returns ``(n, pid, whether a later job)``."""
    import pathlib
    import threading
    import time

    here, pid = pathlib.Path(marks), os.getpid()

    def wait_for(name: str) -> None:
        deadline = time.monotonic() + 30
        while not (here / name).exists() and time.monotonic() < deadline:
            time.sleep(0.005)

    if not (here / f"printer-{pid}").exists():

        def late() -> None:
            wait_for(f"runs-{pid}")
            print(f"late out from a thread of job {n}")
            sent = dispy_provisional_result("late")  # noqa: F821
            (here / f"printed-{pid}.tmp").write_text(str(sent))
            os.rename(here / f"printed-{pid}.tmp", here / f"printed-{pid}")

        threading.Thread(target=late, daemon=True).start()
        (here / f"printer-{pid}").touch()
        print(f"job {n} out")
        return n, pid, False
    print(f"job {n} out")
    (here / f"runs-{pid}").touch()
    wait_for(f"printed-{pid}")
    return n, pid, True


def prints_a_lot(megabytes: int) -> int:
    """Prints ``megabytes`` MiB in 1 MiB lines; the KiB its worker's peak resident
    memory grew by meanwhile."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    line = "x" * (2**20 - 9)
    for n in range(megabytes):
        print(f"{n:08d}{line}")  # a new string each (not one kept many times)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before


# -- tests ----------------------------------------------------------------------------


#: A new program (its own Ray driver) that opens two clusters on the Ray cluster at
#: argv[1], one after the other, and runs a job on each.
TWO_CLUSTERS = """
import sys
import dispynb
from dispynb.backends.ray import RayEngine

engine = RayEngine(sys.argv[1])
for n in (3, 4):
    with dispynb.JobCluster(abs, engine=engine) as cluster:
        print(cluster.submit(-n)())
engine.close()
"""


def _client_program(code: str, head: RayHead) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (a client program taking the cluster's address) to its end."""
    root = Path(__file__).resolve().parents[2]
    env = {**head.env, "PYTHONPATH": str(root), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, "-c", code, head.address],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
    )


@pytest.mark.timeout(300)
def test_opening_clusters_logs_no_ray_error_about_actor_arguments(
    head: RayHead,
) -> None:
    """A program that opens clusters on Ray printed an error line of Ray's, "E ...
    core_worker.cc: Actor with class name: 'JobActor' ... has constructor arguments
    in the object store and max_restarts > 0 ..." (Ray warns that a restarted actor
    may find them gone; dispynb keeps them for the cluster's life)."""
    proc = _client_program(TWO_CLUSTERS, head)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3", "4"], proc.stdout
    assert "constructor arguments in the object store" not in proc.stderr, proc.stderr


#: A program whose one job ends its worker process (``os._exit``); it prints the
#: job's status, then whether the raylet's paragraph about the dead worker reached
#: the ``dispynb.backends.ray`` logger (waiting for it: it comes when it comes).
DYING_WORKER = """
import logging, sys, threading
import dispynb
from dispynb.backends.ray import RayEngine

routed = threading.Event()

class Routed(logging.Handler):
    def emit(self, record):
        if "A worker died or was killed" in record.getMessage():
            routed.set()

ray_logger = logging.getLogger("dispynb.backends.ray")
ray_logger.addHandler(Routed(logging.DEBUG))
ray_logger.setLevel(logging.DEBUG)
ray_logger.propagate = False  # only here: the default handler is INFO's, on stderr

def leave(code):
    import os
    os._exit(code)

engine = RayEngine(sys.argv[1])
with dispynb.JobCluster(leave, engine=engine) as cluster:
    job = cluster.submit(3)
    job()
    print(job.status.name, flush=True)
    print("routed" if routed.wait(60) else "not routed", flush=True)
engine.close()
"""


@pytest.mark.timeout(300)
def test_a_job_ending_its_worker_prints_no_raylet_paragraph(head: RayHead) -> None:
    """A job that ends its worker's process (``os._exit``, a fatal signal) had
    Ray's driver print into the program's stdout (a notebook's cell) the raylet's
    paragraph "(raylet) A worker died or was killed while executing a task by an
    unexpected system error ... OOM killer ... ray stop --force ...", under
    dispynb's own line saying what happened to the job. It goes to the
    ``dispynb.backends.ray`` logger; the job ends Terminated as before."""
    proc = _client_program(DYING_WORKER, head)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["Terminated", "routed"], proc.stdout
    assert "A worker died" not in proc.stdout + proc.stderr


def test_a_log_handler_set_up_by_an_earlier_job_logs_into_each_jobs_stderr(
    engine: RayEngine,
) -> None:
    """The first job on each actor calls ``logging.basicConfig()``: its handler
    kept that job's stderr, so the lines the later jobs on that actor logged were
    lost. Now each job's stderr holds its own (as on dispynb's nodes,
    tests/nodeserver/test_thread_output.py). Six jobs one after the other on the
    cluster's two CPUs: at least four follow another on their actor."""
    with JobCluster(log_a_line, engine=engine) as cluster:
        jobs = []
        for n in range(6):
            job = cluster.submit(n)
            assert job() == n, (job.status, job.exception)
            jobs.append(job)
    assert [job.stderr for job in jobs] == [f"job {n} logs\n" for n in range(6)]


def test_a_thread_of_a_job_that_returned_prints_and_sends_nothing_as_a_later_job(
    engine: RayEngine, tmp_path: Path
) -> None:
    """A thread the first job on an actor left running prints while a later job
    runs on that actor: its line was in that job's stdout, and its provisional
    result was sent as that job's. Now, as on dispynb's nodes
    (tests/nodeserver/test_thread_output.py), the line goes to the actor's own
    stdout and the send is refused (-1)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    seen: list[tuple[JobStatus, Any]] = []
    lock = threading.Lock()

    def job_status(job: DispyJob) -> None:
        with lock:
            seen.append((job.status, job.result))

    jobs = []
    with JobCluster(leave_a_printer, job_status=job_status, engine=engine) as cluster:
        for n in range(6):  # two actors: a third job at the latest follows another
            job = cluster.submit(n, str(marks))
            outcome = job()
            assert outcome is not None, (job.status, job.exception)
            jobs.append(job)
            if outcome[2]:
                break
        else:
            raise AssertionError(f"no job followed another on its actor: {jobs}")
        wait_for(lambda: len(seen) >= len(jobs), "the callbacks")
    assert [job.stdout for job in jobs] == [f"job {n} out\n" for n in range(len(jobs))]
    assert (marks / f"printed-{outcome[1]}").read_text() == "-1"
    assert {status for status, _ in seen} == {JobStatus.Finished}


def test_a_job_printing_more_than_max_output_size_is_not_held_whole(
    engine: RayEngine,
) -> None:
    """A job prints 256 MiB with max_output_size=1000: its actor keeps the first
    1000 characters and counts the rest, as dispynb's nodes and the Dask runner do;
    the job's stdout says how many were dropped. Before, the actor held all of it
    until the job ended (its memory grew by 256 MiB and more), then cut it."""
    with JobCluster(prints_a_lot, max_output_size=1000, engine=engine) as cluster:
        job = cluster.submit(256)
        grown = job()
        assert job.status is JobStatus.Finished, job.exception
    assert grown < 64 * 1024, f"the worker grew by {grown} KiB"
    assert job.stdout == "00000000" + "x" * 992 + "\n" + (
        f"[dispynb: {256 * 2**20 - 1000} more characters of stdout dropped: a job "
        f"keeps 1000 ({OUTPUT_OPTION})]\n"
    )
