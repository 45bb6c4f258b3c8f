"""A node started with a small ``--max-message-size`` (1 MB) returns results up to
what its messages hold besides a result's header and the job's output."""

from __future__ import annotations

import re
from pathlib import Path

from dispynb import DispyJob, JobCluster
from tests.nodeproc import running_node


def zeros(size: int) -> bytes:
    return bytes(size)


def test_a_node_of_a_small_max_message_size_returns_results(tmp_path: Path) -> None:
    """It returned none: a fixed 1 MiB of room for a result's header left a node
    of 1 MB (which it accepted at start) "a limit of 0 bytes" for every result."""
    with (
        running_node(tmp_path / "node", "--max-message-size", "1000000") as node,
        JobCluster(zeros, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        small = cluster.submit(1000)
        assert small() == bytes(1000), small.exception
        over = cluster.submit(2_000_000)
        over()
        assert over.status == DispyJob.Terminated
        assert "ResultTooLarge" in over.exception, over.exception
        assert "--max-message-size" in over.exception, over.exception
        found = re.search(r"over the limit of (\d+) bytes", over.exception)
        assert found, over.exception
        limit = int(found[1])
        # The limit it states is the real one: a result just under it comes back.
        under = cluster.submit(limit - 1000)
        assert under() == bytes(limit - 1000), under.exception
    assert limit > 500_000
