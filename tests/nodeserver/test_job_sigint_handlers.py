"""Stop of a job that installed a SIGINT handler of its own, on a real node.

The job's handler runs first; if it returns (it swallowed the signal, or only set a
flag), the KeyboardInterrupt follows at once: the job stops, its ``finally`` blocks
run. Before, such a job ran on until the node killed its worker 3 s later, its
cleanup never run. The handler goes with its job: the next one on the worker is
stopped as any.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from tests.jobs import wait_until
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow


def sigint_job(folder: str, how: str) -> str:
    """``swallow``/``chain``: install a SIGINT handler that swallows the signal, or
    one that calls the handler it replaced, then wait for the Stop, noting the
    handler's call and the cleanup. ``ignore``: ignore SIGINT and return.
    ``catch``: note the handler found, then catch the Stop's KeyboardInterrupt."""
    import pathlib
    import signal
    import time

    here = pathlib.Path(folder)
    replaced = signal.getsignal(signal.SIGINT)

    def swallow(signum: int, frame: object) -> None:
        (here / "handler-ran").write_text(how)

    def chain(signum: int, frame: object) -> None:
        (here / "handler-ran").write_text(how)
        if callable(replaced):
            replaced(signum, frame)

    if how == "ignore":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return "ignoring"
    if how == "catch":
        (here / "found").write_text(repr(replaced))
        try:
            (here / "started").write_text(how)
            time.sleep(60)
        except KeyboardInterrupt:
            return "interrupted"
        return "not stopped"
    handler = swallow if how == "swallow" else chain
    signal.signal(signal.SIGINT, handler)
    assert signal.getsignal(signal.SIGINT) is handler
    try:
        (here / "started").write_text(how)
        time.sleep(60)
        return "not stopped"
    finally:
        (here / "cleaned").write_text(how)


@pytest.mark.parametrize("how", ["swallow", "chain"])
def test_a_job_with_its_own_sigint_handler_stops_at_once_and_cleans_up(
    tmp_path: Path, how: str
) -> None:
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(sigint_job, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        job = cluster.submit(str(tmp_path), how)
        wait_until((tmp_path / "started").exists)
        cluster.cancel(job)
        job()
        assert job.status == DispyJob.Terminated, (job.status, job.result)
        assert "terminated at the client's request" in (job.exception or "")
        assert (tmp_path / "handler-ran").read_text() == how
        # Ended by the KeyboardInterrupt, not killed: its finally block ran.
        assert (tmp_path / "cleaned").exists(), "the job was killed, not stopped"


def test_a_jobs_sigint_handler_goes_with_it(tmp_path: Path) -> None:
    # One worker: the second job runs where the first ignored SIGINT. It found
    # SIGINT ignored, and its Stop killed it at once, its except never run.
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(sigint_job, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        assert cluster.submit(str(tmp_path), "ignore")() == "ignoring"
        job = cluster.submit(str(tmp_path), "catch")
        wait_until((tmp_path / "started").exists)
        assert "SIG_IGN" not in (tmp_path / "found").read_text()
        cluster.cancel(job)
        assert job() == "interrupted", (job.status, job.exception)
        assert job.status == DispyJob.Finished
