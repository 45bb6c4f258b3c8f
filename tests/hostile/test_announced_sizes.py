"""A node holding the secret announces result chunks it never sends.

A `ResultChunk` says how large its buffer is (``size``) and carries a part of it. A
compromised node (the real listener and handshake, then our own messages) announces
a buffer of almost the client's result cap for a job it runs and sends one byte of
it: the client used to allocate the whole buffer at once (``bytearray(size)``,
zeroed: every page touched). Then it sends real bytes of that buffer and ends the
job with a result that is not streamed: the stream was kept until the node left.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
from collections.abc import Iterator

import psutil
import pytest

from dispynb import DispyJob, JobCluster
from dispynb.protocol.messages import (
    JobProvisional,
    JobResults,
    JobSubmit,
    ResultChunk,
)
from dispynb.transport.connection import Connection
from tests.hostile.scripted import ScriptedNode, finished
from tests.hostile.tools import wait_for
from tests.transport.util import SECRET, serving_in_thread

MiB = 1 << 20
#: What the node announces: just under the client's default result cap (1 GiB
#: messages, less 1 MiB of room).
ANNOUNCED = 1000 * MiB
#: What it then sends of that buffer, in one chunk, before ending the job.
SENT = 96 * MiB
WAIT = 30.0


def square(x: int) -> int:
    return x * x


class AnnouncingNode(ScriptedNode):
    """For its job: a chunk announcing `ANNOUNCED` bytes with one byte of them and
    a provisional result; once ``go_on`` is set, `SENT` more bytes of that buffer
    and a result that is not streamed."""

    def __init__(self) -> None:
        super().__init__()
        self.go_on = threading.Event()
        self.data = memoryview(bytearray(SENT))  # made before the client measures

    async def jobs(self, conn: Connection, message: JobSubmit) -> None:
        for key, attempt, *_rest in message.jobs:
            await self._announce(conn, message.comp_id, key, attempt)

    async def _announce(
        self, conn: Connection, comp_id: int, key: int, attempt: int
    ) -> None:
        def chunk(offset: int) -> ResultChunk:
            return ResultChunk(
                comp_id=comp_id,
                key=key,
                attempt=attempt,
                index=0,
                offset=offset,
                size=ANNOUNCED,
            )

        conn.write(chunk(0), [b"x"])
        conn.write(
            JobProvisional(comp_id=comp_id, key=key, attempt=attempt),
            [pickle.dumps("announced")],
        )
        await asyncio.to_thread(self.go_on.wait, WAIT)
        conn.write(chunk(1), [self.data])
        entry = finished(key, attempt)
        conn.write(JobResults(comp_id=comp_id, results=[entry]), [pickle.dumps(49)])


@pytest.fixture
def announcing_node() -> Iterator[tuple[int, AnnouncingNode]]:
    node = AnnouncingNode()
    with serving_in_thread(node) as port:
        yield port, node


@pytest.mark.attack(
    id="announced-chunk-sizes",
    title="A node holding the secret announces a 1,000 MiB result buffer for its job "
    "and sends 1 byte of it; then 96 MiB more and a result that is not streamed",
    goal="the client holds what arrived only: RSS growth under 32 MiB while the "
    "buffer is announced (was +1,000 MiB), the 96 MiB freed when the job ends (was: "
    "kept until the node left)",
)
@pytest.mark.timeout(120)
def test_announced_chunk_sizes_cost_the_client_nothing(announcing_node, measure):
    port, node = announcing_node
    me = psutil.Process()
    with JobCluster(square, nodes=[f"127.0.0.1:{port}"], secret=SECRET) as cluster:
        before = me.memory_info().rss
        job = cluster.submit(7)
        try:
            wait_for(
                lambda: job.status == DispyJob.ProvisionalResult,
                "the provisional result after the announcing chunk",
                WAIT,
            )
            announced = (me.memory_info().rss - before) / MiB
        finally:
            node.go_on.set()
        assert job.wait(WAIT), "the job did not end"
        assert job.result == 49
        after = (me.memory_info().rss - before) / MiB
        measure(
            f"client RSS +{announced:.0f} MiB with 1 byte of a 1,000 MiB buffer "
            f"received; +{after:.0f} MiB once the job ended with 96 MiB of it sent"
        )
        assert announced < 32
        assert after < 32
