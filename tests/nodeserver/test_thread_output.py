"""A job's stdout and stderr hold what that job wrote, not what a thread an earlier
job left running writes meanwhile.

Real ``python -m nodeserver`` processes and a real client; one CPU, so both jobs
run on the same worker, one after the other.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import JobCluster
from dispynb.limits import DEFAULT_MAX_OUTPUT
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow


def leave_a_printer(n: int, marks: str) -> str:
    """Job 0 starts a thread and returns; the thread waits until job 1 runs, then
    prints to stdout and stderr and notes it did. Job 1 prints, has a thread of its
    own print, and returns once the note is there."""
    import os
    import pathlib
    import sys
    import threading
    import time

    here = pathlib.Path(marks)

    def wait_for(name: str) -> None:
        deadline = time.monotonic() + 30
        while not (here / name).exists() and time.monotonic() < deadline:
            time.sleep(0.005)

    if n == 0:

        def late() -> None:
            wait_for("job-1-runs")
            print("late out from a thread of job 0")
            print("late err from a thread of job 0", file=sys.stderr)
            (here / "printed.tmp").touch()
            os.rename(here / "printed.tmp", here / "printed")

        print("job 0 out")
        threading.Thread(target=late, daemon=True).start()
        return "job 0"
    print("job 1 out")
    (here / "job-1-runs").touch()
    own = threading.Thread(
        target=print, args=("job 1 err from its thread",), kwargs={"file": sys.stderr}
    )
    own.start()
    own.join()
    wait_for("printed")
    return "job 1"


@pytest.mark.parametrize("max_output", [DEFAULT_MAX_OUTPUT, None])
def test_a_thread_of_a_job_that_returned_prints_on_the_nodes_streams(
    tmp_path: Path, max_output: int | None
) -> None:
    """Job 0's thread prints while job 1 runs: its lines were in job 1's stdout and
    stderr (the worker's streams are job 1's captures then). Now job 1's output is
    job 1's own (its thread's line included), and the late lines go to the
    worker's own streams: the node's log here."""
    marks = tmp_path / "marks"
    marks.mkdir()
    with running_node(tmp_path / "node", cpus=1) as node:
        with JobCluster(
            leave_a_printer,
            nodes=[node.spec],
            secret=node.secret,
            max_output_size=max_output,
        ) as cluster:
            first = cluster.submit(0, str(marks))
            assert first() == "job 0", (first.status, first.exception)
            second = cluster.submit(1, str(marks))
            assert second() == "job 1", (second.status, second.exception)
        assert (marks / "printed").exists()
        log = node.log_text()
    assert first.stdout == "job 0 out\n", first.stdout
    assert second.stdout == "job 1 out\n", second.stdout
    assert second.stderr == "job 1 err from its thread\n", second.stderr
    # Not lost: the worker's own stdout and stderr are the node's.
    assert "late out from a thread of job 0" in log, log
    assert "late err from a thread of job 0" in log, log


def log_a_line(n: int) -> int:
    """Job 0 sets up logging as a script does (its handler keeps the stderr it
    finds: job 0's); every job logs a line."""
    import logging

    if n == 0:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("job").info("job %d logs", n)
    return n


@pytest.mark.parametrize("max_output", [DEFAULT_MAX_OUTPUT, None])
def test_a_log_handler_set_up_by_an_earlier_job_logs_into_each_jobs_stderr(
    tmp_path: Path, max_output: int | None
) -> None:
    """Job 0 calls ``logging.basicConfig()``: its StreamHandler kept job 0's stderr,
    a capture no later job's was, so the lines jobs 1 and 2 logged on that worker
    were lost (dispy runs each job in its own process: each logs into its own
    stderr). Now a worker's sys.stderr is one object for all its jobs, writing into
    the running job's output."""
    with (
        running_node(tmp_path / "node", cpus=1) as node,
        JobCluster(
            log_a_line,
            nodes=[node.spec],
            secret=node.secret,
            max_output_size=max_output,
        ) as cluster,
    ):
        jobs = []
        for n in range(3):  # one after the other, on the node's one worker
            job = cluster.submit(n)
            assert job() == n, (job.status, job.exception)
            jobs.append(job)
    assert [job.stderr for job in jobs] == [f"job {n} logs\n" for n in range(3)]
