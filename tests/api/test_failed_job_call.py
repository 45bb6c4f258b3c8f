"""``job()`` of a job that failed returns None, as dispy's does: a newcomer's
``print([job() for job in jobs])`` printed ``[0, 1, None, None]`` and not a word of
the ``ValueError`` behind the Nones. The first such ``job()`` of a process now warns,
naming the job, its status and its error, and where the traceback is."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from dispynb import job as job_module
from dispynb.job import DispyJob, JobStatus
from dispynb.jobenv import TERMINATED_AT_REQUEST
from tests.logged import logged_messages
from tests.nodeproc import node_env

SCRIPT = """\
from dispynb import JobCluster, LocalCluster


def compute(n):
    if n >= 2:
        raise ValueError(f"bad n {n}")
    return n * n


if __name__ == "__main__":
    with LocalCluster(cpus=2) as local, JobCluster(compute, nodes=local) as cluster:
        jobs = [cluster.submit_job_id(i, i) for i in range(4)]
        print([job() for job in jobs])
"""


def _warnings_of_script(directory: Path) -> list[str]:
    """Run ``directory``'s script.py as a user does (no ``DISPYNB_*`` setting):
    once it printed its jobs' ``[0, 1, None, None]``, the messages it logged."""
    done = subprocess.run(
        [sys.executable, "script.py"],
        cwd=directory,
        env=node_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[0, 1, None, None]\n"
    return logged_messages(done.stderr)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_scripts_failed_jobs_are_said_once_where_job_returned_none(
    tmp_path: Path,
) -> None:
    (tmp_path / "script.py").write_text(SCRIPT)
    assert _warnings_of_script(tmp_path) == [
        "job 2 ended Terminated (ValueError: bad n 2): job() returns None for a job "
        "that failed, as dispy's does; job.exception holds its traceback, and "
        "job.status == DispyJob.Finished tells a result from a failure (said once)"
    ]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_module_the_node_lacks_is_said_with_the_error_and_its_fix(
    tmp_path: Path,
) -> None:
    """A job importing a module beside the script that the node cannot import: the
    warning named only the advice under the error, in double parentheses ("ended
    Terminated ((this client imports 'helper' ...))"); now the error, then the fix."""
    (tmp_path / "helper.py").write_text("def f(n):\n    return n + 1\n")
    (tmp_path / "script.py").write_text(
        SCRIPT.replace('raise ValueError(f"bad n {n}")', "import helper")
    )
    assert _warnings_of_script(tmp_path) == [
        "job 2 ended Terminated (ModuleNotFoundError: No module named 'helper'; this "
        f"client imports 'helper' from {tmp_path / 'helper.py'}, the node cannot: "
        "send it with JobCluster(..., depends=[helper]), or install it on the node): "
        "job() returns None for a job that failed, as dispy's does; job.exception "
        "holds its traceback, and job.status == DispyJob.Finished tells a result "
        "from a failure (said once)"
    ]


def test_a_cancelled_or_finished_job_returns_without_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """None from a job the program cancelled (queued: ``Cancelled``; running:
    ``Terminated`` at its request, as a node reports it), or a result of None, is
    no news. A running job cancelled warned, as if it had failed."""
    monkeypatch.setattr(job_module, "_failure_said", False)
    cancelled, finished = DispyJob(1, (), {}), DispyJob(2, (), {})
    stopped = DispyJob(3, (), {})
    cancelled._complete(JobStatus.Cancelled, exception="cancelled")
    finished._complete(JobStatus.Finished, result=None)
    stopped._complete(JobStatus.Terminated, exception=TERMINATED_AT_REQUEST)
    assert cancelled() is None
    assert finished() is None
    assert stopped() is None
    assert caplog.records == []


def test_awaiting_a_failed_job_warns_as_calling_it_does(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``await job`` in a notebook cell is ``job()`` without blocking the kernel:
    its None for a failed job was as silent."""
    monkeypatch.setattr(job_module, "_failure_said", False)
    failed = DispyJob(7, (0,), {})

    async def end_then_await() -> object:
        asyncio.get_running_loop().call_soon(
            lambda: failed._complete(JobStatus.Abandoned, exception="node lost")
        )
        return await failed

    assert asyncio.run(end_then_await()) is None
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "job 7 ended Abandoned (node lost): job() returns None for a job that failed"
    )
