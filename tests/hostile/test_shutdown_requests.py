"""A job asks its node to shut down (dispy's ``dispynode_shutdown()``) in a loop, on a
node that lets no client stop it (no ``--client_shutdown``): each refusal was a
warning line in the node's log."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import JobCluster
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow

CALLS = 20_000


def ask_to_shut_down(calls: int) -> int:
    """Call ``dispynode_shutdown()`` ``calls`` times; how many were sent."""
    return sum(dispynode_shutdown() == 0 for _ in range(calls))  # type: ignore[name-defined]  # noqa: F821


@pytest.mark.attack(
    id="shutdown-request-flood",
    title=f"A job calls dispynode_shutdown() {CALLS:,} times on a node started "
    "without --client_shutdown",
    goal="the node runs on; at most 4 lines about them in its log, and one with the "
    f"count when it stops (was: a warning each, {CALLS:,} lines)",
)
@pytest.mark.timeout(120)
def test_shutdown_requests_flood_no_log(tmp_path: Path, measure) -> None:
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(ask_to_shut_down, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        job = cluster.submit(CALLS)
        sent = job()
        assert job.exception is None, job.exception
        again = cluster.submit(1)
        assert again() == 1  # the node serves on
        while_running = node.log_text().count("dispynode_shutdown()")
    log = node.log_text()
    lines = log.count("dispynode_shutdown()")
    measure(
        f"{sent:,} requests sent; {while_running} log lines about them while the "
        f"node ran, {lines} with its stop"
    )
    assert sent >= CALLS
    assert while_running <= 4 and lines <= 5, log[-2000:]
