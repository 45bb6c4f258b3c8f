"""Two nodes on one destination directory (its default, ``<tmp>/dispynb``, is every
node's of a user on the machine): one's file store is not the other's.

Real ``dispynb-node`` processes, real clients."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from tests.nodeproc import start_node

pytestmark = pytest.mark.slow


def size(data: bytes) -> int:
    return len(data)


def _stores(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name.startswith(".store-"))


def test_a_node_does_not_remove_the_files_another_nodes_jobs_use(tmp_path):
    """Node b released an object the client of node a had put too (the same data):
    b removed it from the store a uses, and a's next job failed ('was not sent to
    this node'). The second node keeps a store of its own, removed as it stops, or
    by the next node to start if it was killed."""
    dest = tmp_path / "dest"
    first = start_node(tmp_path / "a", "--dest-path", str(dest), name="a")
    try:
        second = start_node(tmp_path / "b", "--dest-path", str(dest), name="b")
        try:
            data = b"d" * 3_000_000
            with JobCluster(
                size, nodes=[first.spec], secret=first.secret, recover_file=False
            ) as on_first:
                mine = on_first.put(data)
                assert on_first.submit(mine)() == len(data)
                with JobCluster(
                    size, nodes=[second.spec], secret=second.secret,
                    recover_file=False,
                ) as on_second:  # fmt: skip
                    assert on_second.submit(on_second.put(data))() == len(data)
                job = on_first.submit(mine)
                assert job() == len(data), job.exception
                assert job.status == DispyJob.Finished
            assert "keeps its own in" in second.log_text()
            assert len(_stores(dest)) == 1
        finally:
            assert second.stop() == 0
        assert _stores(dest) == []  # removed as it stopped
        killed = start_node(tmp_path / "c", "--dest-path", str(dest), name="c")
        assert len(_stores(dest)) == 1
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait(30)
        assert len(_stores(dest)) == 1  # left behind
        again = start_node(tmp_path / "d", "--dest-path", str(dest), name="d")
        try:
            assert len(_stores(dest)) == 1  # its own: the killed one's went
        finally:
            assert again.stop() == 0
    finally:
        assert first.stop() == 0
    assert (dest / ".store").is_dir()  # the shared one stays
