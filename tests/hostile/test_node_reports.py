"""A node that holds the secret and sends malformed resource reports.

The message schema checks only that `NodeStatus.avail` is a list; its figures reach
arithmetic: a dispy program's ``node.avail_info.cpu``, its repr, and the shared
scheduler's sum over its nodes, which it reports to every client each pulse. A
scripted node (the real listener and handshake, then our own messages) answers its
jobs honestly but reports strings, lists and NaN for its resources.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispynb import JobCluster, SharedJobCluster
from dispynb.protocol.messages import (
    JobResults,
    JobSubmit,
    NodeStatus,
    Ping,
)
from dispynb.transport.connection import Connection
from tests.hostile.scripted import ScriptedNode, finished
from tests.hostile.tools import wait_for
from tests.sharedsched.harness import SchedulerProcess, add_user
from tests.transport.util import SECRET, serving_in_thread

pytestmark = pytest.mark.slow

#: What the node reports for its resources, in turn.
MALFORMED = ([math.nan, 1.0, 2.0, 3.0], [[1], {}, None, 1.0], ["x", 1.0, 2.0, 3.0])


def square(x: int) -> int:
    return x * x


class MisreportingNode(ScriptedNode):
    """Answers every job with 49; reports malformed resources on each connection,
    before each result and every 0.1 s."""

    def __init__(self) -> None:
        super().__init__()
        self.pings = 0  # the pulse of whoever is connected (a scheduler's, each 0.5 s)

    def _report(self, conn: Connection) -> None:
        for avail in MALFORMED:
            conn.write(NodeStatus(avail=avail))

    async def _pulse(self, conn: Connection) -> None:
        while True:
            self._report(conn)
            await asyncio.sleep(0.1)

    async def serve(self, conn: Connection) -> None:
        pulse = asyncio.create_task(self._pulse(conn))
        try:
            await super().serve(conn)
        finally:
            pulse.cancel()

    async def jobs(self, conn: Connection, message: JobSubmit) -> None:
        self._report(conn)
        for key, attempt, *_rest in message.jobs:
            conn.write(
                JobResults(comp_id=message.comp_id, results=[finished(key, attempt)]),
                [pickle.dumps(49)],
            )

    def other(self, conn: Connection, message: Any) -> None:
        if isinstance(message, Ping):
            self.pings += 1


@pytest.fixture
def misreporting_node() -> Iterator[tuple[int, MisreportingNode]]:
    node = MisreportingNode()
    with serving_in_thread(node) as port:
        yield port, node


@pytest.mark.attack(
    id="node-malformed-avail",
    title="A node holding the secret reports strings, lists and NaN as its "
    "available resources (NodeStatus) before each result",
    goal="its jobs' results are used; avail_info is None (unknown), said once",
)
def test_a_clients_node_with_malformed_reports_is_shown_unknown(
    misreporting_node, measure, caplog
):
    port, _node = misreporting_node
    with JobCluster(square, nodes=[f"127.0.0.1:{port}"], secret=SECRET) as cluster:
        jobs = [cluster.submit(i) for i in range(3)]
        results = [job() for job in jobs]
        # The reports came before the results on the same connection: handled.
        info = cluster.status().nodes[0].avail_info
        repr(cluster.status().nodes[0])
    warnings = [r for r in caplog.records if "malformed resource" in r.getMessage()]
    measure(f"results {results}; avail_info {info!r}; {len(warnings)} warning(s)")
    assert results == [49, 49, 49]
    # Before: DispyNodeAvailInfo(cpu=nan, ...), or ('x', ...) whose repr raised.
    assert info is None
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


@pytest.mark.attack(
    id="sched-node-malformed-avail",
    title="A node of a shared scheduler reports strings, lists and NaN as its "
    "available resources on its every connection, every 0.1 s",
    goal="the scheduler's pulse goes on (its sum over nodes is not broken); "
    "a client's jobs run; one warning in the scheduler's log",
)
def test_a_schedulers_node_with_malformed_reports_breaks_nothing(
    misreporting_node, tmp_path: Path, measure
):
    port, node = misreporting_node
    credential = add_user(tmp_path, "alice")
    sched = SchedulerProcess(tmp_path, [f"127.0.0.1:{port}"], SECRET.decode())
    sched.start()
    try:
        with SharedJobCluster(
            square,
            scheduler_host=sched.address,
            secret_file=str(credential),
            pulse_interval=0.5,
        ) as cluster:
            results = [job() for job in [cluster.submit(i) for i in range(3)]]
            # Each pulse reports the sum over the nodes to the client, then pings
            # the nodes: before, the sum raised and the pulse was over for good.
            pings = node.pings
            took = wait_for(lambda: node.pings >= pings + 3, "3 more pulses", 15.0)
        log = sched.log_text()
    finally:
        with contextlib.suppress(Exception):
            sched.stop()
    lines = [line for line in log.splitlines() if "malformed resource" in line]
    crashed = "Traceback" in log
    measure(
        f"results {results}; 3 pulses in {took:.1f} s; {len(lines)} warning line(s)"
    )
    assert results == [49, 49, 49]
    assert not crashed, log[-3000:]
    assert len(lines) == 1, lines
