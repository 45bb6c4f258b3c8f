"""A node holding the secret that answers a job with a bad frame: a wrong MAC, a
length over the client's cap, or bytes that are no frame.

The fake node (the real listener and handshake, then our own bytes) answers a job a
few milliseconds late. The node is dropped, its job ends Abandoned with the reason,
``job()`` returns, and the user's thread gets no exception of the transport's.
(Written for 3fcde4f, where the waiting thread read the socket itself; that path is
gone, the attack stays.)
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dispynb import DispyJob, DispyNode, JobCluster
from dispynb.errors import ConnectionClosedError
from dispynb.protocol.auth import MAC_SIZE
from dispynb.protocol.framing import encode_frames
from dispynb.protocol.messages import (
    JobSubmit,
)
from dispynb.transport.connection import Connection
from dispynb.transport.links import SocketLink
from tests.hostile.scripted import ScriptedNode
from tests.transport.util import SECRET, serving_in_thread

WAIT = 10.0


def square(x: int) -> int:
    return x * x


def _bad_bytes(kind: str) -> bytes:
    if kind == "wrong-mac":  # a well-formed frame whose MAC is not the session's
        head, buffers = encode_frames([b"\x93\x01\x02\x03"], MAC_SIZE)
        return head + b"".join(bytes(b) for b in buffers) + b"\0" * MAC_SIZE
    if kind == "oversized":  # a length far over the client's cap, then some bytes
        return struct.pack(">I", 0xFFFFFFF0) + b"x" * 4096
    return b"\xff" * 64  # no frame at all


class BadNode(ScriptedNode):
    """Sets the computation up, then answers the first job with ``kind``'s bytes."""

    ENDS = (ConnectionClosedError, OSError)  # it writes to the socket itself

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    async def jobs(self, conn: Connection, message: JobSubmit) -> None:
        await asyncio.sleep(0.003)  # the user's thread waits by now
        link = conn._link
        assert isinstance(link, SocketLink)
        link._sock.sendall(_bad_bytes(self.kind))


@pytest.fixture
def bad_node(request: pytest.FixtureRequest) -> Iterator[tuple[int, BadNode]]:
    node = BadNode(request.param)
    with serving_in_thread(node, WAIT) as port:
        yield port, node


@pytest.mark.attack(
    id="bad-frame-answer",
    title="A node holding the secret answers a job with a wrong-MAC frame, a length "
    "over the client's cap, or bytes that are no frame",
    goal="the node dropped once, its job Abandoned with a reason, job() returns",
)
@pytest.mark.parametrize(
    "bad_node", ["wrong-mac", "oversized", "no-frame"], indirect=True
)
def test_a_bad_frame_from_a_node_drops_it_and_abandons_its_job(
    bad_node: tuple[int, BadNode],
    allow_error_logs: Any,
    measure: Callable[[str], None],
) -> None:
    port, bad = bad_node
    closed: list[str] = []
    with JobCluster(
        square,
        nodes=[f"127.0.0.1:{port}"],
        secret=SECRET,
        cluster_status=lambda status, node, job: (
            closed.append(str(node)) if status == DispyNode.Closed else None
        ),
    ) as cluster:
        job = cluster.submit(7)
        value = job()  # returns: no hang, no transport exception
        deadline = time.monotonic() + WAIT  # the callback thread says it
        while not closed and time.monotonic() < deadline:
            time.sleep(0.01)
        reason = (
            " ".join(str(job.exception).split())
            .split(" was lost ")[-1]
            .strip("()")[:120]
        )
        measure(
            f"{bad.kind}: job() returned {value!r}, job {job.status.name} ({reason}); "
            f"node dropped {len(closed)} time(s)"
        )
        assert value is None
        assert job.status == DispyJob.Abandoned, job.status
        assert job.exception, "the reason is said"
        assert len(closed) == 1, closed
