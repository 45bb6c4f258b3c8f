"""``recover_jobs`` from a node that drains (SIGTERM, as systemd stops it) while it
keeps a crashed client's results: the call says the node is shutting down and when
to call again, not that no node runs there; once the node is started again, the
next call gets every result.

A real node process; the crashed client is a real process killed with SIGKILL.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

import dispynb
from dispynb import DispyJob
from tests.api.crashclient import killed_after, start_client
from tests.api.test_recovery_kept import kept_files
from tests.jobs import wait_until
from tests.nodeproc import NODE_WAIT, start_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CLIENT = """
import sys, time
import dispynb as dispy

def make(n, marks, go):
    import os, time
    open(os.path.join(marks, str(n)), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(go + str(n)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return n * 10

node, secret, journal, marks, go = sys.argv[1:6]
cluster = dispy.JobCluster(make, nodes=[node], secret=secret, recover_file=journal)
cluster.submit_job_id("kept", 0, marks, go)
cluster.submit_job_id("running", 1, marks, go)
print("submitted", flush=True)
time.sleep(60)  # killed before it gets further
"""


def test_recover_jobs_from_a_draining_node_says_it_is_shutting_down(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "node"
    node = start_node(directory, "--cpus", "2", "--drain-timeout", "60")
    go = tmp_path / "go"
    try:
        journal, marks = tmp_path / "journal.db", tmp_path / "marks"
        marks.mkdir()
        client = start_client(
            tmp_path, CLIENT, node.spec, node.secret, str(journal), str(marks),
            str(go),
        )  # fmt: skip
        with killed_after(client):
            wait_until(lambda: len(list(marks.iterdir())) == 2)
        (tmp_path / "go0").touch()  # "kept" ends, its client gone: kept
        wait_until(lambda: len(kept_files(directory)) == 1)
        node.proc.send_signal(signal.SIGTERM)  # as systemd stops it
        wait_until(lambda: "draining: running jobs may finish" in node.log_text())
        jobs = {job.id: job for job in _recover(journal, node.secret)}
        for job in jobs.values():
            assert job.status == DispyJob.Abandoned, (job.status, job.exception)
            why = job.exception or ""
            # Before: "nothing listens on port ... is dispynb-node running there?"
            assert "is dispynb-node running there" not in why, why
            assert "took no connection to recover the job" in why, why
            assert "'cli-node' is shutting down (SIGTERM)" in why, why
            assert "call recover_jobs again once it is back" in why, why
        (tmp_path / "go1").touch()  # the running job ends: drained, it stops
        assert node.proc.wait(NODE_WAIT) == 0, node.log_text()
        # Started again on its port and directory: every result is there.
        (directory / "port").unlink()  # written again once it listens
        node = start_node(directory, "--cpus", "2", "--port", str(node.port))
        jobs = {job.id: job for job in _recover(journal, node.secret)}
        assert jobs["kept"].status == DispyJob.Finished, jobs["kept"].exception
        assert jobs["kept"].result == 0
        assert jobs["running"].status == DispyJob.Finished, jobs["running"].exception
        assert jobs["running"].result == 10
    finally:
        (tmp_path / "go1").touch()
        node.stop()


def _recover(journal: Path, secret: str) -> list[DispyJob]:
    return dispynb.recover_jobs(str(journal), timeout=30, secret=secret)
