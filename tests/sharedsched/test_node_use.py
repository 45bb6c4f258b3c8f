"""``deallocate_node`` and ``allocate_node`` through a shared scheduler, as dispy's
SharedJobCluster has them: a node taken out gets none of that cluster's jobs (its
jobs there finish, those pinned to it wait; other users' jobs still go there) until
``allocate_node`` gives it back."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from dispynb import LocalCluster
from dispynb.job import JobStatus
from dispynb.protocol.messages import Message, NodeManage, NodeManaged, NodeStatus
from tests.jobs import wait_until
from tests.sharedsched.harness import SchedulerProcess, raw_scheduler_session
from tests.sharedsched.nodeuse import alice_and_bob, by_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

WAIT = 30.0


def test_a_deallocated_node_gets_none_of_the_clusters_jobs_until_allocated(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = nodes.names
    with alice_and_bob(scheduler.address, users, [first, second]) as (alice, bob):
        node = by_name(alice)[first]
        # Two of alice's jobs run there, two more pinned to it wait at the scheduler.
        pinned = [alice.submit_node(node, 1.0) for _ in range(4)]
        assert all(job is not None for job in pinned)
        wait_until(lambda: sum(job.status == JobStatus.Running for job in pinned) == 2)
        running = [job for job in pinned if job.status == JobStatus.Running]
        waiting = [job for job in pinned if job not in running]

        assert alice.deallocate_node(node) == 0
        for job in running:  # those there finish
            assert job() == first, (job.status, job.exception)
        # None of her jobs go there now, with its 2 CPUs idle: all run on the other.
        assert {job() for job in [alice.submit(0.2) for _ in range(6)]} == {second}
        assert all(job.status == JobStatus.Created for job in waiting)
        assert alice.submit_node(node, 0.0) is None  # as dispy's
        # Only alice took it out: bob's jobs still go there.
        assert bob.submit_node(first, 0.0)() == first

        assert alice.allocate_node(first) == 0
        for job in waiting:  # given back: the jobs pinned to it run there
            assert job() == first, (job.status, job.exception)
        spread = [alice.submit(0.5) for _ in range(8)]  # for her 4 CPUs
        assert {job() for job in spread} == {first, second}
        submitted = alice.submit_node(node, 0.0)
        assert submitted is not None and submitted() == first

        # A node the scheduler does not run the cluster on: -1, said why.
        with caplog.at_level(logging.WARNING, logger="dispynb.shared"):
            assert alice.deallocate_node("no-such-node") == -1
            assert alice.allocate_node("127.0.0.1:1") == -1
        assert "none of the nodes the scheduler runs this cluster on" in caplog.text
    log = scheduler.log_text()
    assert f"alice/where: its client deallocated node {node.ip_addr}:" in log
    assert f"alice/where: its client allocated node {node.ip_addr}:" in log


def test_a_request_naming_no_computation_of_the_session_is_answered_once(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    """A raw client's `NodeManage` naming a computation its session does not have
    (none, or another user's) gets one answer: a `NodeManaged` saying so. Before,
    an `Error` came first, then the `NodeManaged`: two answers to one request (a
    client logged the first as a warning from its node)."""

    async def exchange() -> list[Message]:
        conn = await raw_scheduler_session(scheduler.port, users["alice"])
        try:
            for request in (1, 2):
                ask = NodeManage(
                    comp_id=99, request=request, node="127.0.0.1:1", action="cpus"
                )
                conn.write(ask)
            replies: list[Message] = []
            async with asyncio.timeout(WAIT):
                # the answers come in order: all to request 1 before request 2's
                while True:
                    reply, _buffers = await conn.recv()
                    if isinstance(reply, NodeStatus):  # its pulse
                        continue
                    replies.append(reply)
                    if isinstance(reply, NodeManaged) and reply.request == 2:
                        return replies
        finally:
            conn.close()

    replies = asyncio.run(exchange())
    assert [type(reply) for reply in replies] == [NodeManaged, NodeManaged], replies
    first = replies[0]
    assert isinstance(first, NodeManaged) and first.request == 1
    assert "no computation 99 of user 'alice'" in first.error, first.error
    assert "own computations" in first.error
