"""A client facing something that is not an honest node: a silent peer, garbage,
a hang-up, a refusal, an impostor replaying a real node's handshake."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from dispynb.errors import (
    AuthenticationError,
    ConnectionClosedError,
    ConnectTimeoutError,
    ProtocolError,
    ProtocolVersionError,
)
from dispynb.protocol.handshake import ClientHandshake
from dispynb.protocol.messages import (
    Error,
)
from dispynb.transport.connector import connect
from tests.asyncutil import run
from tests.transport.util import (
    HOST,
    SECRET,
    raw_connection,
    read_message,
    serving,
    unsigned_frame,
)


async def _fake_node(reply: Callable[[asyncio.StreamReader], Awaitable[bytes]]):
    """A TCP server on 127.0.0.1 that answers each connection with ``reply``."""
    writers = []

    async def handle(reader, writer):
        writers.append(writer)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            data = await reply(reader)
            if data:
                writer.write(data)
                await writer.drain()
            await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    return server, writers


@contextlib.asynccontextmanager
async def fake_node(reply):
    server, writers = await _fake_node(reply)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def _silent(reader):
    await reader.read()
    return b""


def test_connect_silent_peer_raises_connect_timeout():
    async def main():
        async with fake_node(_silent) as port:
            with pytest.raises(ConnectTimeoutError, match="handshake"):
                await connect(
                    HOST,
                    port,
                    secret=SECRET,
                    max_message_size=1024,
                    handshake_timeout=0.3,
                )

    run(main())


def test_connect_peer_sending_garbage_raises_protocol_error():
    async def garbage(reader):
        await reader.readexactly(8)
        return b"HTTP/1.1 400 Bad Request\r\n\r\n"

    async def main():
        async with fake_node(garbage) as port:
            with pytest.raises(ProtocolError, match=f"{HOST}:{port}"):
                await connect(HOST, port, secret=SECRET, max_message_size=1024)

    run(main())


def test_connect_peer_hanging_up_raises_connection_closed():
    async def hang_up(reader):
        raise OSError("hang up")

    async def main():
        async with fake_node(hang_up) as port:
            with pytest.raises(ConnectionClosedError):
                await connect(HOST, port, secret=SECRET, max_message_size=1024)

    run(main())


@pytest.mark.parametrize(
    ("code", "kind"),
    [("version", ProtocolVersionError), ("auth", AuthenticationError)],
)
def test_connect_node_refusal_raises_mapped_error(code, kind):
    async def refuse(reader):
        await reader.readexactly(8)
        return unsigned_frame(Error(code=code, message="node says no, version 9"))

    async def main():
        async with fake_node(refuse) as port:
            with pytest.raises(kind, match="node says no, version 9"):
                await connect(HOST, port, secret=SECRET, max_message_size=1024)

    run(main())


def test_connect_impostor_replaying_captured_node_messages_rejected():
    async def main():
        # Capture a real node's challenge and proof for some other client...
        async with (
            serving() as (listener, _),
            raw_connection(listener.port) as (reader, writer),
        ):
            handshake = ClientHandshake(SECRET)
            writer.write(unsigned_frame(handshake.hello()))
            captured, _ = await read_message(reader)
            writer.write(unsigned_frame(handshake.on_challenge(captured)))
            confirm, _ = await read_message(reader)

        # ...and serve them to a new client: its nonce differs, so the proof fails.
        async def replay(reader):
            await read_message(reader)
            return unsigned_frame(captured) + unsigned_frame(confirm)

        async with fake_node(replay) as port:
            with pytest.raises(AuthenticationError, match="secret"):
                await connect(HOST, port, secret=SECRET, max_message_size=1024)

    run(main())
