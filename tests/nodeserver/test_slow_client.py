"""A client on a slow link: it takes its results slowly, pinging all along.

A node reads no more of a client that has not taken 32 MiB sent to it (its
requests, and its pings, wait in its socket: `nodeserver.session._unread`). A
client catching up on its results for longer than ``--orphan-timeout`` was then
taken for silent and its computation freed, its jobs lost, though it read and
pinged all the time. Real node; a raw client that reads one result at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from dispynb.protocol import serialize
from dispynb.protocol.messages import (
    ComputationReady,
    ComputationSetup,
    JobResults,
    JobSubmit,
    Ping,
)
from nodeserver.outbox import OUT_HIGH
from tests.hostile.tools import limited_node
from tests.transport.util import RawClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MiB = 1 << 20
RESULT = 4 * MiB
#: Results past what the node sends before it reads the client no more.
JOBS = 2 * OUT_HIGH // RESULT
#: Seconds the client takes over each result (the orphan timeout passes meanwhile).
PACE = 0.5
ORPHAN_TIMEOUT = 3.0


def four_mib(i: int) -> bytes:
    return bytes([i]) * (4 << 20)


async def _read_slowly(port: int, secret: bytes) -> set[int]:
    """Run ``JOBS`` jobs; take their results one per ``PACE`` s, pinging."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = RawClient(reader, writer)
    got: set[int] = set()
    try:
        await client.handshake(secret)
        bundle = serialize.dumps({"func": four_mib, "setup": None, "setup_args": ()})
        setup = ComputationSetup(comp_id=1, name="slow", workers=2, pulse_interval=1.0)
        writer.write(client.signed_frame(setup, bundle))
        message, _ = await asyncio.wait_for(client.receive(), 30)
        assert isinstance(message, ComputationReady), message
        buffers = []
        for i in range(JOBS):
            buffers.extend(serialize.dumps(((i,), {})))
        submit = JobSubmit(comp_id=1, jobs=[[i, 1, 1] for i in range(JOBS)])
        writer.write(client.signed_frame(submit, buffers))
        # Pinging from the start: no silence the client is responsible for.
        deadline = time.monotonic() + 90
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while len(got) < JOBS and time.monotonic() < deadline:
                writer.write(client.signed_frame(Ping()))
                await asyncio.sleep(PACE)
                message, _ = await asyncio.wait_for(client.receive(), 30)
                if isinstance(message, JobResults):
                    got.update(entry[0] for entry in message.results)
        return got
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 10)


def test_a_client_catching_up_slowly_keeps_its_computation(tmp_path: Path) -> None:
    with limited_node(
        tmp_path / "node", "--orphan-timeout", str(ORPHAN_TIMEOUT), cpus=2
    ) as node:
        got = asyncio.run(_read_slowly(node.port, node.secret.encode()))
        log = node.log_text()
    assert "freeing its computations" not in log, log
    assert got == set(range(JOBS))
