"""Helpers for transport tests: an echo node, clients, raw sockets, bounded waits.

Everything listens on 127.0.0.1 with port 0; every wait has a time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from dispynb.errors import ConnectionClosedError
from dispynb.protocol.auth import MAC_SIZE, MessageSigner, MessageVerifier
from dispynb.protocol.framing import (
    PREFIX_SIZE,
    Buffer,
    encode_frames,
    parse_prefix,
    split_body,
)
from dispynb.protocol.handshake import ClientHandshake
from dispynb.protocol.messages import (
    Message,
    Welcome,
    WireMessage,
    pack_header,
    unpack_header,
)
from dispynb.transport.admission import Admission
from dispynb.transport.connection import Connection
from dispynb.transport.connector import connect
from dispynb.transport.listener import Listener

SECRET = b"transport-test-secret"
HOST = "127.0.0.1"
MAX_SIZE = 64 * 1024 * 1024
WAIT = 5.0  # seconds; only reached when a test fails


def make_welcome() -> Welcome:
    return Welcome(
        name="echo-node",
        cpus=3,
        platform="test-platform",
        address=f"{HOST}:0",
        max_message_size=MAX_SIZE,
        pid=12345,
    )


class Echo:
    """Connection handler that records every message and sends it back."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.received: list[tuple[Message, list[bytes]]] = []
        self.connections: list[Connection] = []
        self.active = 0

    async def __call__(self, conn: Connection, name: str) -> None:
        self.names.append(name)
        self.connections.append(conn)
        self.active += 1
        try:
            while True:
                try:
                    message, buffers = await conn.recv()
                except ConnectionClosedError:
                    return
                self.received.append((message, [bytes(b) for b in buffers]))
                await conn.send(message, buffers)
        finally:
            self.active -= 1


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)


def warnings_from(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """Messages of WARNING records of the listener that contain ``text``."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
        and r.name == "dispynb.transport.listener"
        and text in r.getMessage()
    ]


@contextlib.asynccontextmanager
async def serving(
    *,
    secret: bytes | None = SECRET,
    max_message_size: int = MAX_SIZE,
    ssl_context=None,
    handshake_timeout: float = WAIT,
    handler: Echo | None = None,
    admission: Admission | None = None,
) -> AsyncIterator[tuple[Listener, Echo]]:
    """An echo node on 127.0.0.1; stopped, with its connections closed, on exit."""
    echo = handler or Echo()
    listener = Listener(
        echo,
        secret=secret,
        make_welcome=make_welcome,
        max_message_size=max_message_size,
        ssl_context=ssl_context,
        handshake_timeout=handshake_timeout,
        admission=admission,
    )
    listener.listen_on(HOST, 0)
    try:
        yield listener, echo
    finally:
        listener.stop()
        for conn in echo.connections:
            conn.close()
        await wait_until(lambda: echo.active == 0 and listener._pending == 0)


@contextlib.contextmanager
def serving_in_thread(handler: Any, wait: float = 10.0) -> Iterator[int]:
    """`serving` ``handler`` (`Echo`-like: a coroutine callable with `connections` and
    `active`) on an event loop of its own thread; yields its port.

    For tests whose code under test is synchronous (a `JobCluster`, `recover_jobs`)
    and talks to a scripted node.
    """
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    port: list[int] = []

    async def run() -> None:
        async with serving(handler=handler) as (listener, _):
            port.append(listener.port)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),))
    thread.start()
    try:
        assert ready.wait(wait), "the scripted node did not start listening"
        yield port[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(wait)
        loop.close()


@contextlib.asynccontextmanager
async def client(
    port: int, *, secret: bytes | None = SECRET, max_message_size: int = MAX_SIZE, **kw
) -> AsyncIterator[tuple[Connection, Welcome]]:
    conn, welcome = await connect(
        HOST, port, secret=secret, max_message_size=max_message_size, **kw
    )
    try:
        yield conn, welcome
    finally:
        conn.close()


async def echo_round_trip(port: int, **kw) -> None:
    """A well-behaved client connects, sends one message and gets it back."""
    from dispynb.protocol.messages import JobCancel

    async with client(port, **kw) as (conn, _):
        sent = JobCancel(comp_id=1, key=2, attempt=3)
        await conn.send(sent, [b"payload"])
        message, buffers = await conn.recv()
        assert message == sent
        assert [bytes(b) for b in buffers] == [b"payload"]


# --- raw sockets -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_connection(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    data = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(65536):
            data += chunk
    return bytes(data)


async def send_and_half_close(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Send ``data`` then EOF; the server may already have hung up."""
    with contextlib.suppress(OSError):
        if data:
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


def unsigned_frame(message: WireMessage, buffers: list[Buffer] | None = None) -> bytes:
    head, parts = encode_frames([pack_header(message.to_header()), *(buffers or [])])
    return b"".join([head, *parts])


async def read_message(
    reader: asyncio.StreamReader, verifier: MessageVerifier | None = None
) -> tuple[WireMessage, list[memoryview]]:
    """Read one frame with the sans-IO pieces; verify it when ``verifier`` is given."""
    mac_size = MAC_SIZE if verifier else 0
    prefix = await reader.readexactly(PREFIX_SIZE)
    size, count = parse_prefix(prefix, MAX_SIZE, mac_size)
    body = await reader.readexactly(size)
    buffers, signed, mac = split_body(body, count, mac_size)
    if verifier is not None:
        verifier.verify((prefix, signed), mac)
    header = unpack_header(buffers[0], trusted=verifier is not None)
    return WireMessage.from_header(header), buffers[1:]


class RawClient:
    """A client built from the sans-IO objects on a raw socket, to misbehave later."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.signer: MessageSigner | None = None
        self.verifier: MessageVerifier | None = None

    async def handshake(self, secret: bytes | None = SECRET) -> Welcome:
        handshake = ClientHandshake(secret, name="raw")
        self.writer.write(unsigned_frame(handshake.hello()))
        challenge, _ = await read_message(self.reader)
        self.writer.write(unsigned_frame(handshake.on_challenge(challenge)))
        confirm, _ = await read_message(self.reader)
        handshake.on_confirm(confirm)
        send_key, receive_key = handshake.keys()
        self.signer = MessageSigner(send_key)
        self.verifier = MessageVerifier(receive_key)
        welcome, _ = await read_message(self.reader, self.verifier)
        assert isinstance(welcome, Welcome)
        return welcome

    def signed_frame(self, message: WireMessage, buffers: list[Buffer] = ()) -> bytes:
        """The bytes of the next signed message (advances the sequence number)."""
        assert self.signer is not None
        head, parts = encode_frames(
            [pack_header(message.to_header()), *buffers], MAC_SIZE
        )
        mac = self.signer.sign([head, *parts])
        return b"".join([head, *parts, mac])

    async def receive(self) -> tuple[WireMessage, list[memoryview]]:
        return await read_message(self.reader, self.verifier)
