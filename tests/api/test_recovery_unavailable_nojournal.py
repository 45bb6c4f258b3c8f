"""``recover_jobs`` of a default recovery file (``_dispy_*``: jobs not journaled)
from a node that cannot read one of the results it kept now (its disk full for the
copy it sends from): the call returns that job ``Abandoned``, saying why, beside
the results it got, not a shorter list and a log line.

A real node on a tmpfs of its own (`tmpfs_node`), filled from outside.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import dispynb
from dispynb import DispyJob
from tests.api.crashclient import killed_after, start_client
from tests.api.test_recovery_kept import kept_files
from tests.api.test_recovery_unavailable import BIG, MiB
from tests.jobs import wait_until
from tests.nodeserver.test_disk_faults import tmpfs_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CLIENT = """
import sys, time
import dispynb as dispy

def make(n, marks, go, size):
    import os, time
    open(os.path.join(marks, str(n)), "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return bytes(size) if size else n

node, secret, marks, go, big = sys.argv[1:6]
cluster = dispy.JobCluster(make, nodes=[node], secret=secret)  # a _dispy_* file
cluster.submit(0, marks, go, int(big))
cluster.submit(1, marks, go, 0)
print("submitted", flush=True)
time.sleep(120)  # killed before it gets further
"""


def test_a_result_the_node_cannot_read_now_is_returned_abandoned_saying_why(
    tmp_path: Path,
) -> None:
    node = tmpfs_node(tmp_path / "node", "150M", cpus=2, tmpdir=True)
    seen = Path(f"/proc/{node.proc.pid}/root{tmp_path / 'node'}")
    inside = seen / "dest"
    try:
        marks, go = tmp_path / "marks", tmp_path / "go"
        marks.mkdir()
        client = start_client(
            tmp_path, CLIENT, node.spec, node.secret, str(marks), str(go), str(BIG)
        )
        with killed_after(client):
            wait_until(lambda: len(list(marks.iterdir())) == 2)
        (recover_file,) = tmp_path.glob("_dispy_*[0-9]")  # not its -wal, -shm
        go.touch()  # both end, their client gone: kept
        wait_until(lambda: len(kept_files(seen)) == 2)
        room = os.statvfs(inside)  # no room for the copy the big one is sent from
        filler = inside / "filler"
        with open(filler, "wb", buffering=0) as handle:
            left = room.f_bavail * room.f_frsize - MiB
            while left > 0:
                left -= handle.write(b"\0" * min(left, MiB))
        jobs = _recover(recover_file, node.secret)
        # Before: the small one only, the big one in a log line.
        abandoned = [job for job in jobs if job.status == DispyJob.Abandoned]
        assert len(abandoned) == 1, [(j.status, j.exception) for j in jobs]
        why = abandoned[0].exception or ""
        assert why.startswith(f"node {node.spec}: "), why
        assert "No space left on device" in why, why
        assert "call recover_jobs again later" in why, why
        assert [job.result for job in jobs if job.status == DispyJob.Finished] == [1]
        assert recover_file.exists()  # kept for the next call
        # Nothing is lost: once the node has room, the next call gets it.
        filler.unlink()
        jobs = _recover(recover_file, node.secret)
        assert all(job.status == DispyJob.Finished for job in jobs), [
            (job.status, job.exception) for job in jobs
        ]
        assert any(job.result == bytes(BIG) for job in jobs)
    finally:
        (tmp_path / "go").touch()
        node.stop()


def _recover(recover_file: Path, secret: str) -> list[DispyJob]:
    return dispynb.recover_jobs(str(recover_file), timeout=30, secret=secret)
