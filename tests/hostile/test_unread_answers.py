"""Requests without reading the answers, against a node and a shared scheduler.

Both answer most of what a client sends (a refusal, a recovery not found...). A
client that sent requests and never read grew the server by the answers, several
hundred bytes each (each small message takes many times its bytes in objects),
without bound: 300,000 refusals made a scheduler 168 MiB larger, and 300,000
recoveries a node 80 MiB. Now a server reads no more of a client that has not taken
what was sent to it (`Connection.unread`): its requests wait in its own socket.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psutil
import pytest

from dispynb import JobCluster
from dispynb.protocol.messages import JobCancel, Message, Recover
from dispynb.transport.connection import Connection
from dispynb.transport.connector import connect
from tests.hostile.test_scheduler import alices_jobs_meanwhile, people, shared_nodes
from tests.nodeproc import running_node
from tests.sharedsched.harness import raw_scheduler_session
from tests.tcpstate import flushed_or_held

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

__all__ = ["people"]  # the fixture

MiB = 1 << 20
#: Requests sent at most (the server stops reading long before, now), and how long
#: a batch of them may take to be sent or held (`flushed_or_held`).
REQUESTS = 600_000
WAIT = 60.0
#: What the server may grow by meanwhile.
BOUND = 96 * MiB


def square(n: int) -> int:
    return n * n


async def _flood(conn: Connection, pid: int, request: type[Message]) -> tuple:
    """Send requests of kind ``request`` without reading, until the server takes no
    more; what was sent, whether it stopped taking them, and its growth."""
    server = psutil.Process(pid)
    before = peak = server.memory_info().rss
    sent, stuck = 0, False
    while sent < REQUESTS and not stuck:
        for _ in range(1000):
            conn.write(
                JobCancel(comp_id=999, key=sent, attempt=1)
                if request is JobCancel
                else Recover(comp_id=1, recovery_id=f"{sent:032x}")
            )
            sent += 1
        stuck = not await flushed_or_held(conn, WAIT)
        peak = max(peak, server.memory_info().rss)
    return sent, stuck, peak - before


def _node_victim(spec: str, secret: str) -> list[int]:
    with JobCluster(square, nodes=[spec], secret=secret) as cluster:
        return [job() for job in [cluster.submit(n) for n in range(4)]]


@pytest.mark.attack(
    id="unread-answers",
    title="A client sends requests the server answers (a scheduler: refusals; a "
    f"node: recoveries not found), up to {REQUESTS:,}, and never reads",
    goal=f"the server stops reading it and grows by under {BOUND // MiB} MiB; "
    "another client is served meanwhile (was: +168 MiB per 300,000 answers at a "
    "scheduler, +80 MiB at a node, without bound)",
)
def test_a_scheduler_stops_reading_a_client_that_reads_no_answer(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    with shared_nodes(tmp_path, people) as sched:
        assert sched.proc is not None

        async def attack() -> tuple:
            conn = await raw_scheduler_session(sched.port, people["mallory"])
            try:
                flood = await _flood(conn, sched.proc.pid, JobCancel)
                alices = await alices_jobs_meanwhile(sched.address, people["alice"])
                return (*flood, alices)
            finally:
                conn.close()

        sent, stuck, grown, alices = asyncio.run(attack())
    measure(
        f"scheduler: {sent:,} refused requests sent, reading stopped: {stuck}, "
        f"+{grown // MiB} MiB; alice's results {alices}"
    )
    assert stuck and grown < BOUND
    assert alices == [0, 1, 4, 9]


@pytest.mark.attack(
    id="unread-answers",
    title="A client sends requests the server answers (a scheduler: refusals; a "
    f"node: recoveries not found), up to {REQUESTS:,}, and never reads",
    goal=f"the server stops reading it and grows by under {BOUND // MiB} MiB; "
    "another client is served meanwhile (was: +168 MiB per 300,000 answers at a "
    "scheduler, +80 MiB at a node, without bound)",
)
def test_a_node_stops_reading_a_client_that_reads_no_answer(
    tmp_path: Path, measure
) -> None:
    with running_node(tmp_path / "node", cpus=2) as node:

        async def attack() -> tuple:
            conn, _ = await connect(
                "127.0.0.1",
                node.port,
                secret=node.secret.encode(),
                max_message_size=MiB,
            )
            try:
                flood = await _flood(conn, node.proc.pid, Recover)
                start = time.monotonic()
                victim = await asyncio.to_thread(_node_victim, node.spec, node.secret)
                return (*flood, victim, time.monotonic() - start)
            finally:
                conn.close()

        sent, stuck, grown, victim, took = asyncio.run(attack())
    measure(
        f"node: {sent:,} recoveries sent, reading stopped: {stuck}, "
        f"+{grown // MiB} MiB; another client's results {victim} in {took:.1f} s"
    )
    assert stuck and grown < BOUND
    assert victim == [0, 1, 4, 9]
