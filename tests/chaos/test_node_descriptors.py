"""A node server at its file descriptor limit (``ulimit -n``, ``LimitNOFILE=``) when
the first large message of a client arrives.

Its MAC is checked with a cipher imported then, which takes a descriptor: the node
cannot check the message. It must tell its client why as it closes the connection
(the client said only 'Connection reset by peer'), and serve again once descriptors
are back. A real node from the command line; the limit lowered on the running node
(``prlimit --pid``) to the descriptors it holds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from tests.chaos.test_scheduler_descriptors import leave_descriptors, set_nofile
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow


def size_of(data: bytes) -> int:
    return len(data)


@pytest.mark.timeout(60)
def test_a_node_that_cannot_check_a_message_for_want_of_descriptors_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DISPYNB_SHARED_MEMORY", "0")  # over the connection
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(
            size_of, nodes=[node.spec], secret=node.secret, pulse_interval=0.3
        ) as cluster,
    ):
        assert cluster.submit(b"x")() == 1  # small: no cipher yet
        before = leave_descriptors(node.proc.pid, spare=False)
        try:
            with caplog.at_level(logging.WARNING, logger="dispynb"):
                job = cluster.submit(b"x" * (1 << 20))
                assert cluster.wait(timeout=30), job.status
        finally:
            set_nofile(node.proc.pid, before)
        assert job.status == DispyJob.Abandoned, job.status
        said = (
            f"node {node.spec} reports: a message could not be checked: the "
            "receiving process (limit "
        )
        [told] = [r.getMessage() for r in caplog.records if said in r.getMessage()]
        assert "out of file descriptors (Too many open files); raise its" in told
        again = cluster.submit(b"y" * (1 << 20))
        assert again() == 1 << 20, (again.status, again.exception)
