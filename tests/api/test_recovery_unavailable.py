"""``recover_jobs`` from a node that cannot read one of the results it kept now (its
disk full for the copy it sends from): each job gets its own state.

A real node whose --dest-path and TMPDIR are a tmpfs of its own (`tmpfs_node`),
filled from outside while a crashed client's jobs are kept there: one ended (its
result, over what the node copies to memory, cannot be copied), one still runs.
The node sends what it can, then tells why it stops, naming that job; the job
still running was abandoned too, with that job's reason, its start forgotten.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import dispynb
from dispynb import DispyJob
from tests.api.crashclient import killed_after, start_client
from tests.api.test_recovery_kept import kept_files
from tests.jobs import wait_until
from tests.nodeserver.test_disk_faults import tmpfs_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MiB = 1 << 20
#: Over `spoolcheck.MEMORY_COPY`: sent from a copy on the disk only.
BIG = 65 * MiB

CLIENT = """
import sys, time
import dispynb as dispy

def make(n, marks, go, size):
    import os, time
    open(os.path.join(marks, str(n)), "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(go + str(n)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return bytes(size) if size else n

node, secret, journal, marks, go, big = sys.argv[1:7]
cluster = dispy.JobCluster(make, nodes=[node], secret=secret, recover_file=journal)
cluster.submit_job_id("big", 0, marks, go, int(big))
cluster.submit_job_id("running", 1, marks, go, 0)
print("submitted", flush=True)
time.sleep(120)  # killed before it gets further
"""


def test_a_result_the_node_cannot_read_now_leaves_the_others_their_state(
    tmp_path: Path,
) -> None:
    node = tmpfs_node(tmp_path / "node", "150M", cpus=2, tmpdir=True)
    # The node's directory as the node sees it (its tmpfs on dest).
    seen = Path(f"/proc/{node.proc.pid}/root{tmp_path / 'node'}")
    inside = seen / "dest"
    try:
        journal, marks, go = tmp_path / "journal.db", tmp_path / "marks", tmp_path
        marks.mkdir()
        client = start_client(
            tmp_path, CLIENT, node.spec, node.secret, str(journal), str(marks),
            str(go / "go"), str(BIG),
        )  # fmt: skip
        with killed_after(client):
            wait_until(lambda: len(list(marks.iterdir())) == 2)
        (go / "go0").touch()  # the big one ends, its client gone: kept
        wait_until(lambda: len(kept_files(seen)) == 1)
        # No room left for the copy the node sends the result from (1 MiB left).
        room = os.statvfs(inside)
        filler = inside / "filler"
        with open(filler, "wb", buffering=0) as handle:
            handle.truncate(0)
            left = room.f_bavail * room.f_frsize - MiB
            while left > 0:
                left -= handle.write(b"\0" * min(left, MiB))
        jobs = {job.id: job for job in _recover(journal, node.secret)}
        big, running = jobs["big"], jobs["running"]
        assert big.status == DispyJob.Abandoned, (big.status, big.exception)
        assert "No space left on device" in (big.exception or ""), big.exception
        assert "call recover_jobs again later" in (big.exception or "")
        # Still running on the node: not abandoned for the big one's reason.
        assert running.status == DispyJob.Running, (running.status, running.exception)
        assert running.exception is None
        # Nothing is lost: once the node has room, the next call gets both.
        (go / "go1").touch()
        wait_until(lambda: len(kept_files(seen)) == 2)
        filler.unlink()
        jobs = {job.id: job for job in _recover(journal, node.secret)}
        assert jobs["running"].status == DispyJob.Finished
        assert jobs["running"].result == 1
        assert jobs["big"].status == DispyJob.Finished, jobs["big"].exception
        assert jobs["big"].result == bytes(BIG)
    finally:
        (tmp_path / "go1").touch()
        node.stop()


def _recover(journal: Path, secret: str) -> list[DispyJob]:
    return dispynb.recover_jobs(str(journal), timeout=30, secret=secret)
