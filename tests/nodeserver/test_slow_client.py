"""A client on a slow link: it takes its results slowly, pinging all along.

A node reads no more of a client that has not taken 32 MiB sent to it (its
requests, and its pings, wait in its socket: `nodeserver.session._unread`). A
client catching up on its results for longer than ``--orphan-timeout`` was then
taken for silent and its computation freed, its jobs lost, though it read and
pinged all the time. Real node; a raw client that reads one result at a time,
and one behind a proxy that passes on what the node sends at a slow pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dispynb.errors import DispynbError
from dispynb.protocol import serialize
from dispynb.protocol.messages import (
    ComputationReady,
    ComputationSetup,
    JobResults,
    JobSubmit,
    Ping,
    Recover,
)
from dispynb.transport.connection import QUEUED_HIGH
from dispynb.transport.connector import connect
from nodeserver.outbox import OUT_HIGH
from tests.hostile.tools import limited_node
from tests.slowlink import slow_link
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


#: The slow link's pace (about 40 KB/s: the kernel's send buffer, megabytes, frees
#: a third, when it takes more of the node's, only every half minute), and how long
#: the client takes the node's answers through it, pinging (several timeouts).
LINK_CHUNK = 4096
LINK_PACE = 0.1
SLOW_FOR = 10.0


async def _catch_up_through_a_slow_link(
    port: int, secret: bytes, log: Callable[[], str]
) -> str:
    """Have the node hold the client's reads (requests it answers, unread), then
    take the answers through the slow link for `SLOW_FOR` s, pinging: the node's
    log then. Then take nothing more, pinging, until the node frees the
    computation (its pings wait unread)."""
    frozen, stop = asyncio.Event(), asyncio.Event()
    links: list[asyncio.Task[Any]] = []
    proxy = await slow_link(port, (frozen, stop), links, LINK_CHUNK, LINK_PACE)
    proxy_port = proxy.sockets[0].getsockname()[1]
    conn, _ = await connect(
        "127.0.0.1", proxy_port, secret=secret, max_message_size=MiB
    )
    try:
        bundle = serialize.dumps({"func": four_mib, "setup": None, "setup_args": ()})
        setup = ComputationSetup(comp_id=1, name="slow", workers=1, pulse_interval=1.0)
        conn.write(setup, bundle)
        async with asyncio.timeout(30):
            while not isinstance((await conn.recv())[0], ComputationReady):
                pass
        # Past `QUEUED_HIGH` answers unread: the node reads no more of it.
        for n in range(2 * QUEUED_HIGH):
            conn.write(Recover(comp_id=2, recovery_id=f"{n:032x}"))
            if n % 1000 == 999:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.flush(), 1.0)

        async def take() -> None:
            with contextlib.suppress(DispynbError):
                while True:
                    await conn.recv()

        async def ping() -> None:
            while True:
                conn.write(Ping())
                await asyncio.sleep(0.5)

        tasks = [asyncio.ensure_future(take()), asyncio.ensure_future(ping())]
        await asyncio.sleep(SLOW_FOR)  # (the test's span: no condition to wait for)
        text = log()
        frozen.set()  # pinging on: its pings wait unread behind the rest
        async with asyncio.timeout(30):
            while "freeing its computations" not in log():
                await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        return text
    finally:
        stop.set()
        conn.close()
        proxy.close()
        await asyncio.gather(*links)


def test_a_client_catching_up_through_a_slow_link_keeps_its_computation(
    tmp_path: Path,
) -> None:
    """At about 40 KB/s the node's socket takes more of what it sends only every
    half minute (once a third of the kernel's buffer is free): counted as taken
    only then, a client reading and pinging all along was silent for
    --orphan-timeout and its computations were freed. What the client's kernel
    took (the node's unacknowledged bytes, TIOCOUTQ) counts now, as at the
    scheduler. A client that takes nothing more is freed."""
    with limited_node(
        tmp_path / "node", "--orphan-timeout", str(ORPHAN_TIMEOUT), cpus=1
    ) as node:
        log = asyncio.run(
            _catch_up_through_a_slow_link(
                node.port, node.secret.encode(), node.log_text
            )
        )
    assert "freeing its computations" not in log, log
