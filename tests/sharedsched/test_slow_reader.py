"""A client on a slow link: it takes what the scheduler sent slowly, pinging all
along.

The scheduler reads no more of a client that has not taken what was sent to it
(`SchedulerSession.serve`): its pings wait in its socket meanwhile. A client
catching up for longer than ``--zombie_interval`` was then taken for a zombie and
its jobs ended, though it read and pinged all the time. Real scheduler; a raw
client behind a proxy that passes on what the scheduler sends at a slow pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispynb import LocalCluster
from dispynb.errors import DispynbError
from dispynb.protocol.messages import Error, JobCancel, Ping
from dispynb.transport.connection import QUEUED_HIGH
from tests.sharedsched.harness import SchedulerProcess, raw_scheduler_session

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: --zombie_interval in minutes: 3 s.
ZOMBIE_MINUTES = "0.05"
#: How long the client reads slowly (several intervals), and the pace of the link
#: to it: bytes every `PACE` s (about 400 KB/s).
SLOW_FOR = 12.0
CHUNK = 8192
PACE = 0.02


@pytest.fixture
def zombie_scheduler(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> Iterator[SchedulerProcess]:
    sched = SchedulerProcess(
        tmp_path,
        nodes.node_specs(),
        nodes.secret,
        args=("--zombie_interval", ZOMBIE_MINUTES),
    )
    sched.start()
    try:
        yield sched
    finally:
        sched.stop()


async def _pace(
    upstream: socket.socket, writer: asyncio.StreamWriter, frozen: asyncio.Event
) -> None:
    """Pass on what the scheduler sends, `CHUNK` bytes every `PACE` s, until
    ``frozen`` (the client stopped, or cut off: it takes nothing more)."""
    loop = asyncio.get_running_loop()
    while not frozen.is_set() and (data := await loop.sock_recv(upstream, CHUNK)):
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(PACE)


async def _forward(reader: asyncio.StreamReader, upstream: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    while data := await reader.read(65536):
        await loop.sock_sendall(upstream, data)


async def _slow_link(
    port: int,
    events: tuple[asyncio.Event, asyncio.Event],
    links: list[asyncio.Task[Any]],
) -> asyncio.Server:
    """A proxy to the scheduler on ``port`` until ``stop``: what the scheduler
    sends goes on slowly (its socket here takes little: the rest waits there)
    until the first of ``events``, and nothing more goes on from the second;
    ``links`` gets the task of each connection it serves."""
    loop = asyncio.get_running_loop()
    frozen, stop = events

    async def link(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        links.append(asyncio.current_task())  # type: ignore[arg-type]
        upstream = socket.socket()
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        upstream.setblocking(False)
        pumps: list[asyncio.Future[Any]] = []
        try:
            await loop.sock_connect(upstream, ("127.0.0.1", port))
            pumps = [
                asyncio.ensure_future(_forward(reader, upstream)),
                asyncio.ensure_future(_pace(upstream, writer, frozen)),
            ]
            await stop.wait()
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            upstream.close()
            writer.close()

    return await asyncio.start_server(link, "127.0.0.1", 0)


async def _catch_up_slowly(
    sched: SchedulerProcess, credential: Path
) -> tuple[list[Error], str]:
    """Send requests the scheduler answers until it reads no more; then take the
    answers through the slow link for `SLOW_FOR` s, pinging: the errors heard and
    the scheduler's log then. Then take nothing more, pinging, until the
    scheduler takes the client for a zombie."""
    frozen, stop = asyncio.Event(), asyncio.Event()
    links: list[asyncio.Task[Any]] = []
    proxy = await _slow_link(sched.port, (frozen, stop), links)
    proxy_port = proxy.sockets[0].getsockname()[1]
    conn = await raw_scheduler_session(proxy_port, credential)
    errors: list[Error] = []
    try:
        # Past `QUEUED_HIGH` answers unread: the scheduler reads no more of it.
        for key in range(2 * QUEUED_HIGH):
            conn.write(JobCancel(comp_id=999, key=key, attempt=1))
            if key % 1000 == 999:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.flush(), 1.0)

        async def take() -> None:
            with contextlib.suppress(DispynbError):
                while True:
                    message, _ = await conn.recv()
                    if isinstance(message, Error) and message.code != "refused":
                        errors.append(message)
            errors.append(Error(code="closed", message="the scheduler closed"))

        async def ping() -> None:
            while True:
                conn.write(Ping())
                await asyncio.sleep(0.5)

        taking = asyncio.ensure_future(take())
        pinging = asyncio.ensure_future(ping())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(taking), SLOW_FOR)
        log = sched.log_text()
        frozen.set()  # pinging on: its pings wait unread behind the rest
        await asyncio.to_thread(sched.wait_for_log, "a zombie", timeout=30)
        pinging.cancel()
        taking.cancel()
        return errors, log
    finally:
        stop.set()
        conn.close()
        proxy.close()
        await asyncio.gather(*links)


def test_a_client_catching_up_slowly_is_no_zombie(
    zombie_scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    """Reading slowly for several --zombie_interval, it is no zombie; taking
    nothing more (stopped, cut off), it is one, its old pings waiting unread."""
    errors, log = asyncio.run(_catch_up_slowly(zombie_scheduler, users["alice"]))
    assert "a zombie" not in log, log
    assert not errors, errors
