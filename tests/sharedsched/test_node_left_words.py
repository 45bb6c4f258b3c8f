"""What the scheduler says of a node that leaves a computation, and of a computation
whose client went away: to the client (`SchedulerNodes.left`, the jobs' reasons)
and in its log. In-process (`tests.sharedsched.test_relay.computation`): the
orderings below are races between a client's calls and a node's answers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from dispynb.protocol.messages import (
    TERMINATED,
    ComputationClose,
    JobResults,
    NodeManage,
    SchedulerNodes,
)
from dispynb.protocol.records import ResultEntry
from tests.sharedsched.test_relay import RecordingConnection, computation, submit


def _reports(client: RecordingConnection) -> list[SchedulerNodes]:
    return [m for _kind, m in client.calls if isinstance(m, SchedulerNodes)]


def _results(client: RecordingConnection) -> list[ResultEntry]:
    return [
        ResultEntry.from_wire(entry)[0]
        for _kind, m in client.calls
        if isinstance(m, JobResults)
        for entry in m.results
    ]


def test_a_node_closed_then_allocated_again_left_closed_not_lost() -> None:
    """close_node, then allocate_node before the node's close was over: the link
    that ends is the closed one, not a lost node. The client was told "it was lost
    (closed)", and its jobs ended there "node ... was lost (closed)"."""

    async def run() -> None:
        comp, upstream, client, _node = computation()
        server: Any = comp.server
        server.set_up_again = lambda comp, name: None  # a new link, later
        server.leave_the_nodes = lambda comp: None
        comp.ready_sent = True
        name = upstream.node.name
        submit(comp, [1])
        comp.send_jobs(upstream, list(comp.queue))
        comp.queue.clear()
        close = NodeManage(
            comp_id=5, request=1, node=name, action="close", terminate=True
        )
        assert comp.manage(close) == ("", 0)
        allocate = NodeManage(comp_id=5, request=2, node=name, action="allocate")
        assert comp.manage(allocate) == ("", 0)
        upstream.closed = True  # the node closed it: its link ends
        comp.node_lost(upstream, "closed")
        comp.report_nodes()
        left = _reports(client)[-1].left
        assert left == {name: "its client closed it (close_node)"}
        (ended,) = _results(client)
        assert ended.exception is not None
        assert ended.exception.startswith(f"its client closed node {name} (close_")
        assert "lost" not in ended.exception

    asyncio.run(run())


def test_a_closing_computation_of_a_gone_client_says_nothing_is_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client gone without a recover_file: its computation is closed, its
    running jobs terminated. Their ends logged "no job of it runs, 0 waiting; 0
    messages ... kept for its client", of a computation that keeps nothing."""

    async def run() -> None:
        comp, upstream, _client, _node = computation()
        server: Any = comp.server
        server.leave_the_nodes = lambda comp: None
        server.check_closed = lambda comp: None
        submit(comp, [1])
        comp.send_jobs(upstream, list(comp.queue))
        comp.queue.clear()
        comp.session = None  # gone
        comp.close(ComputationClose(comp_id=comp.comp_id, terminate=True))
        with caplog.at_level(logging.INFO, logger="schedserver"):
            comp.on_results(
                upstream,
                JobResults(
                    comp_id=5, results=[[1, 0, TERMINATED, 1.0, 2.0, "", "", "", 0]]
                ),
                [],
            )
        assert not comp.running
        assert "kept for its client" not in caplog.text

    asyncio.run(run())
