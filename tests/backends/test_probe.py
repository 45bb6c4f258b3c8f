"""`dispynb.backends._probe`: what answers at an address given as a Ray head or a Dask
scheduler, told in words, for servers on loopback that behave as the wrong ports a
user may give do (the engines' own tests check the errors users see)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from dispynb.backends._probe import probe

#: An HTTP/2 SETTINGS frame of the connection (empty), as a gRPC server sends first.
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def silent(conn: socket.socket) -> None:
    conn.recv(65536)  # reads the greeting, answers nothing


def http(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 505 HTTP Version Not Supported\r\n\r\n")


def grpc(conn: socket.socket) -> None:
    conn.sendall(SETTINGS)
    conn.recv(65536)


def hangs_up(conn: socket.socket) -> None:
    conn.close()


def banner(conn: socket.socket) -> None:
    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """Start a one-connection server on loopback that runs ``handler``; its port."""
    servers: list[socket.socket] = []
    threads: list[threading.Thread] = []
    held: list[socket.socket] = []

    def start(handler: Callable[[socket.socket], None]) -> int:
        server = socket.create_server(("127.0.0.1", 0))
        servers.append(server)

        def run() -> None:
            conn, _ = server.accept()
            held.append(conn)
            handler(conn)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return int(server.getsockname()[1])

    yield start
    # Wake a handler still reading (the probe may have hung up first) before closing
    # its socket: closed under its recv, it raised EBADF in its thread.
    for sock in held:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    for thread in threads:
        thread.join(timeout=5)
    for sock in [*held, *servers]:
        sock.close()


@pytest.mark.parametrize(
    ("handler", "http2", "found"),
    [
        (grpc, True, "an HTTP/2 (gRPC) server"),
        (
            http,
            False,
            "an HTTP server (it answered 'HTTP/1.1 505 HTTP Version Not Supported')",
        ),
        (silent, False, "it accepted the connection but sent nothing within 0.5 s"),
        (hangs_up, False, "it closed the connection without answering"),
        (banner, False, "a server that answered b'SSH-2.0-OpenSSH_9.6\\r\\n'"),
    ],
)
def test_what_answers_is_told_in_words(
    serve: Callable[[Callable[[socket.socket], None]], int],
    handler: Callable[[socket.socket], None],
    http2: bool,
    found: str,
) -> None:
    answer = probe("127.0.0.1", serve(handler), 0.5)
    assert (answer.http2, answer.found) == (http2, found)


def test_nothing_listening_is_an_oserror() -> None:
    with socket.socket() as closed:  # bound, not listening: connections refused
        closed.bind(("127.0.0.1", 0))
        with pytest.raises(ConnectionRefusedError):
            probe("127.0.0.1", closed.getsockname()[1], 0.5)
