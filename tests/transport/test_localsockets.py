"""Unix sockets for nodes this process started (`dispynb.transport.localsockets`):
a node registered under its ``host:port`` is reached over its Unix socket, with the
same authentication as over TCP; a socket that is not there means TCP, as before."""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb.errors import AuthenticationError
from dispynb.protocol.messages import JobCancel
from dispynb.transport import localsockets
from tests.asyncutil import run
from tests.transport.util import HOST, client, serving, wait_until, warnings_from


@pytest.fixture
def registered() -> Iterator[list[tuple[str, int]]]:
    """``(host, port)`` pairs the test registers; unregistered at its end."""
    pairs: list[tuple[str, int]] = []
    yield pairs
    for host, port in pairs:
        localsockets.unregister(host, port)


def test_a_registered_node_is_reached_over_its_unix_socket(
    tmp_path: Path, registered: list[tuple[str, int]]
) -> None:
    path = str(tmp_path / "node.sock")

    async def main() -> None:
        async with serving() as (listener, echo):
            listener.listen_unix(path)
            mode = os.stat(path).st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
            localsockets.register(HOST, listener.port, path)
            registered.append((HOST, listener.port))
            async with client(listener.port, name="over-unix") as (conn, _):
                assert conn.authenticated
                assert conn.peer_address is None  # not TCP: no (host, port) peer
                await conn.send(JobCancel(comp_id=1, key=1, attempt=0))
                await conn.recv()
            assert echo.names == ["over-unix"]
        assert not os.path.exists(path)  # the listener's stop removed it

    run(main())


def test_a_wrong_secret_is_refused_over_the_unix_socket(
    tmp_path: Path,
    registered: list[tuple[str, int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = str(tmp_path / "node.sock")

    async def main() -> None:
        async with serving() as (listener, echo):
            listener.listen_unix(path)
            localsockets.register(HOST, listener.port, path)
            registered.append((HOST, listener.port))
            with pytest.raises(AuthenticationError, match="secret"):
                async with client(listener.port, secret=b"not-the-secret"):
                    pass
            await wait_until(lambda: warnings_from(caplog, "rejected connection"))
            assert echo.names == []
            assert echo.received == []

    run(main())


def test_without_its_unix_socket_a_registered_node_is_reached_over_tcp(
    tmp_path: Path, registered: list[tuple[str, int]]
) -> None:
    async def main() -> None:
        async with serving() as (listener, echo):
            # Registered, but nothing listens there (the node did not make it).
            localsockets.register(HOST, listener.port, str(tmp_path / "none.sock"))
            registered.append((HOST, listener.port))
            async with client(listener.port, name="over-tcp") as (conn, _):
                assert conn.authenticated
                assert conn.peer_address == (HOST, listener.port)
            assert echo.names == ["over-tcp"]

    run(main())


@pytest.mark.parametrize("hello", [b"", b"\x00"], ids=["nothing sent", "partial"])
def test_a_client_hanging_up_in_the_handshake_over_the_unix_socket_is_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, hello: bytes
) -> None:
    """Only the user's own client reaches the socket: a hang-up there (a cluster
    closing while it connects, e.g. at a script's exit) is not a rejected
    connection. The same over TCP still is (anyone may connect there)."""
    path = str(tmp_path / "node.sock")
    caplog.set_level(logging.DEBUG, logger="dispynb.transport.listener")

    def seen() -> int:  # hang-ups the listener has handled: quietly, or warning
        messages = [r.getMessage() for r in caplog.records]
        quiet = sum("hung up in the handshake" in text for text in messages)
        return quiet + len(warnings_from(caplog, "from unix-socket"))

    async def main() -> None:
        async with serving() as (listener, echo):
            listener.listen_unix(path)
            sock = await localsockets.open_unix(path)
            if hello:
                sock.send(hello)
            sock.close()
            await wait_until(lambda: seen() == 1)
            tcp = socket.create_connection((HOST, listener.port))
            tcp.close()
            await wait_until(lambda: warnings_from(caplog, "rejected connections"))
            assert echo.names == []

    run(main())
    rejected = warnings_from(caplog, "rejected connections")
    assert rejected and all("unix-socket" not in text for text in rejected)
