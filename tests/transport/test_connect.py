"""Connecting over real sockets on 127.0.0.1: the handshake, shared-secret
authentication (right, wrong or no secret), the signed Welcome, nothing listening."""

from __future__ import annotations

import pytest

from dispynb.errors import (
    AuthenticationError,
    ConnectionClosedError,
)
from dispynb.protocol.messages import (
    JobCancel,
    Welcome,
)
from dispynb.transport.connector import connect
from tests.asyncutil import run
from tests.transport.util import (
    HOST,
    SECRET,
    RawClient,
    client,
    echo_round_trip,
    make_welcome,
    raw_connection,
    serving,
    wait_until,
    warnings_from,
)


def test_connect_same_secret_gets_welcome_and_signs():
    async def main():
        async with (
            serving() as (listener, echo),
            client(listener.port, name="my-client") as (conn, welcome),
        ):
            assert welcome == make_welcome()
            assert conn.authenticated
            assert not conn.closed
            await conn.send(JobCancel(comp_id=1, key=1, attempt=0))
            await conn.recv()
            assert echo.names == ["my-client"]
            assert echo.connections[0].authenticated

    run(main())


def test_connect_wrong_secret_client_raises_node_warns_handler_not_called(caplog):
    async def main():
        async with serving() as (listener, echo):
            with pytest.raises(AuthenticationError, match="secret") as info:
                async with client(listener.port, secret=b"not-the-secret"):
                    pass
            text = str(info.value)
            assert "not-the-secret" not in text
            assert SECRET.decode() not in text
            await wait_until(lambda: warnings_from(caplog, "rejected connection"))
            assert echo.names == []
            assert echo.received == []

    run(main())


def test_connect_without_secret_to_node_with_secret_raises():
    async def main():
        async with serving() as (listener, echo):
            with pytest.raises(AuthenticationError):
                async with client(listener.port, secret=None):
                    pass
            assert echo.names == []

    run(main())


def test_connect_both_without_secret_succeeds():
    async def main():
        async with serving(secret=None) as (listener, _):
            await echo_round_trip(listener.port, secret=None)

    run(main())


def test_connect_nothing_listening_raises_connection_closed(held_port):
    port = held_port()  # bound but not listening: refused

    async def main():
        with pytest.raises(ConnectionClosedError, match="cannot connect"):
            await connect(HOST, port, secret=SECRET, max_message_size=1024)

    run(main())


def test_raw_client_valid_signed_message_is_echoed():
    async def main():
        async with (
            serving() as (listener, echo),
            raw_connection(listener.port) as (reader, writer),
        ):
            raw = RawClient(reader, writer)
            assert await raw.handshake() == make_welcome()
            sent = JobCancel(comp_id=1, key=1, attempt=0)
            writer.write(raw.signed_frame(sent, [b"abc"]))
            message, buffers = await raw.receive()
            assert message == sent
            assert [bytes(b) for b in buffers] == [b"abc"]
            assert echo.names == ["raw"]

    run(main())


def test_welcome_is_signed_first_message():
    async def main():
        async with (
            serving() as (listener, _),
            raw_connection(listener.port) as (reader, writer),
        ):
            raw = RawClient(reader, writer)
            welcome = await raw.handshake()
            assert isinstance(welcome, Welcome)
            assert raw.verifier.seq == 1

    run(main())
