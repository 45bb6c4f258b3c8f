"""An authenticated connection's life on 127.0.0.1: message-size caps on either
side, closing from either end, its repr."""

from __future__ import annotations

import pytest

from dispynb.errors import (
    ConnectionClosedError,
    FramingError,
)
from dispynb.protocol.messages import (
    JobCancel,
)
from dispynb.transport.connection import Connection
from tests.asyncutil import run
from tests.transport.util import (
    HOST,
    client,
    echo_round_trip,
    serving,
    wait_until,
    warnings_from,
)


def test_recv_message_over_client_cap_raises_framing_error():
    async def main():
        async with (
            serving() as (listener, _),
            client(listener.port, max_message_size=4096) as (conn, _),
        ):
            await conn.send(JobCancel(comp_id=1, key=1, attempt=0), [b"x" * 10_000])
            with pytest.raises(FramingError, match="4096-byte cap"):
                await conn.recv()

    run(main())


def test_recv_message_over_node_cap_closes_connection(caplog):
    async def main():
        async with (
            serving(max_message_size=4096) as (listener, echo),
            client(listener.port) as (conn, _),
        ):
            await conn.send(JobCancel(comp_id=1, key=1, attempt=0), [b"x" * 10_000])
            with pytest.raises(ConnectionClosedError):
                await conn.recv()
            assert warnings_from(caplog, "4096-byte cap")
            assert echo.received == []
            await echo_round_trip(listener.port)

    run(main())


def test_write_after_close_raises_connection_closed():
    async def main():
        async with (
            serving() as (listener, _),
            client(listener.port) as (conn, _),
        ):
            conn.close()
            assert conn.closed
            with pytest.raises(ConnectionClosedError):
                conn.write(JobCancel(comp_id=1, key=1, attempt=0))
            conn.close()  # idempotent

    run(main())


def test_recv_after_node_closes_raises_connection_closed():
    async def main():
        async with (
            serving() as (listener, echo),
            client(listener.port) as (conn, _),
        ):
            await wait_until(lambda: echo.connections)
            echo.connections[0].close()
            with pytest.raises(ConnectionClosedError):
                await conn.recv()

    run(main())


def test_connection_repr_shows_peer_and_state():
    async def main():
        async with (
            serving() as (listener, _),
            client(listener.port) as (conn, _),
        ):
            assert repr(conn) == f"<Connection {HOST}:{listener.port} open>"
            conn.close()
            assert repr(conn).endswith("closed>")
            assert isinstance(conn, Connection)

    run(main())


def test_messages_of_any_buffer_count_and_size_round_trip_signed():
    # `write` frames a message of a few small buffers itself and leaves more
    # buffers, or a larger message, to `encode_frames`: every shape must come back
    # from the echo node intact (each frame's MAC checked on both sides).
    shapes = [
        [],
        [b"a"],
        [b"a", memoryview(b"bc"), bytearray(b"def")],
        [b"x" * i for i in range(1, 5)],  # as many as it frames itself
        [b"x" * i for i in range(1, 6)],  # one more: encode_frames
        [b"y" * 20] * 20,
        [b"z" * (64 * 1024 - 100)],  # around the size joined whole
        [b"z" * (64 * 1024 - 20)],
        [b"w" * (300 * 1024)],
    ]

    async def main():
        async with serving() as (listener, _), client(listener.port) as (conn, _):
            for index, buffers in enumerate(shapes):
                sent = JobCancel(comp_id=index, key=len(buffers), attempt=0)
                conn.write(sent, buffers)
            for index, buffers in enumerate(shapes):
                message, received = await conn.recv()
                assert message == JobCancel(comp_id=index, key=len(buffers), attempt=0)
                assert [bytes(b) for b in received] == [bytes(b) for b in buffers]

    run(main())
