"""`slow_link`: a proxy on 127.0.0.1 that passes on what a server sends at a slow
pace, with backpressure: what it has not passed on waits in the server's socket,
as on a slow link (`tests.toxic.ToxicProxy` reads ahead without bound: the server
would see everything taken at once)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

#: The proxy's socket to the server takes little: the rest waits at the server.
UPSTREAM_RCVBUF = 16384


async def _pace(
    upstream: socket.socket,
    writer: asyncio.StreamWriter,
    frozen: asyncio.Event,
    chunk: int,
    pace: float,
) -> None:
    """Pass on what the server sends, ``chunk`` bytes every ``pace`` s, until
    ``frozen`` (the client stopped, or cut off: it takes nothing more)."""
    loop = asyncio.get_running_loop()
    while not frozen.is_set() and (data := await loop.sock_recv(upstream, chunk)):
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(pace)


async def _forward(reader: asyncio.StreamReader, upstream: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    while data := await reader.read(65536):
        await loop.sock_sendall(upstream, data)


async def slow_link(
    port: int,
    events: tuple[asyncio.Event, asyncio.Event],
    links: list[asyncio.Task[Any]],
    chunk: int = 8192,
    pace: float = 0.02,
) -> asyncio.Server:
    """A proxy to the server on ``port``: what the server sends goes on
    ``chunk`` bytes every ``pace`` s until the first of ``events`` is set, and
    nothing more goes on from then; each link ends once the second is.
    ``links`` gets the task of each connection it serves (to be awaited after)."""
    loop = asyncio.get_running_loop()
    frozen, stop = events

    async def link(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        links.append(asyncio.current_task())  # type: ignore[arg-type]
        upstream = socket.socket()
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UPSTREAM_RCVBUF)
        upstream.setblocking(False)
        pumps: list[asyncio.Future[Any]] = []
        try:
            await loop.sock_connect(upstream, ("127.0.0.1", port))
            pumps = [
                asyncio.ensure_future(_forward(reader, upstream)),
                asyncio.ensure_future(_pace(upstream, writer, frozen, chunk, pace)),
            ]
            await stop.wait()
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            upstream.close()
            writer.close()

    return await asyncio.start_server(link, "127.0.0.1", 0)
