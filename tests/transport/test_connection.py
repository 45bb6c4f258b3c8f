"""Tests of authenticated connections over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import weakref
from collections.abc import Awaitable, Callable

import pytest

from dispynb.errors import (
    AuthenticationError,
    ConnectionClosedError,
    ConnectTimeoutError,
    FramingError,
    ProtocolError,
    ProtocolVersionError,
)
from dispynb.protocol.framing import split_body
from dispynb.protocol.handshake import ClientHandshake
from dispynb.protocol.messages import (
    Error,
    JobCancel,
    JobSubmit,
    Welcome,
    WireMessage,
    unpack_header,
)
from dispynb.transport.connection import RELAY_MAX, Connection
from dispynb.transport.connector import connect
from dispynb.transport.links import READ_LOWAT
from tests.asyncutil import run
from tests.transport.util import (
    HOST,
    SECRET,
    Echo,
    RawClient,
    client,
    echo_round_trip,
    make_welcome,
    raw_connection,
    read_message,
    read_until_closed,
    serving,
    unsigned_frame,
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


def test_connect_several_buffers_with_10_mb_round_trip_intact():
    big = bytearray(os.urandom(10 * 1024 * 1024))
    buffers = [b"", b"small", big, memoryview(b"x" * 70_000), b"last"]
    sent = JobSubmit(comp_id=7, jobs=[[1, 0, 2], [2, 0, 3]])

    async def main():
        async with (
            serving() as (listener, echo),
            client(listener.port) as (conn, _),
        ):
            sent_before = conn.bytes_sent
            received_before = conn.bytes_received
            await conn.send(sent, buffers)
            message, received = await conn.recv()
            assert message == sent
            assert [bytes(b) for b in received] == [bytes(b) for b in buffers]
            assert echo.received[0][1][2] == big
            size = conn.bytes_sent - sent_before
            assert size > len(big)
            assert conn.bytes_received - received_before == size

    run(main())


def test_connect_many_pipelined_messages_arrive_in_order():
    async def main():
        async with (
            serving() as (listener, _),
            client(listener.port) as (conn, _),
        ):
            for key in range(200):
                conn.write(JobCancel(comp_id=1, key=key, attempt=0), [b"k" * key])
            for key in range(200):
                message, buffers = await conn.recv()
                assert message.key == key
                assert bytes(buffers[0]) == b"k" * key

    run(main())


def test_relay_passes_a_received_message_on_signed_for_the_other_connection():
    """A relay (the shared scheduler) passes a message on as it came: the peer of
    the other connection gets it intact, and later messages there stay in sequence
    (a relayed frame is signed with that connection's next MAC)."""
    sent = JobSubmit(comp_id=7, jobs=[[1, 0, 2]], limits=[[1, 5.0, None]])
    buffers = [b"first", b"x" * 1000]

    async def main():
        async with (
            serving() as (listener, echo),
            client(listener.port, name="from") as (source, _),
            client(listener.port, name="to") as (target, _),
        ):
            await source.send(sent, buffers)
            await source.recv()  # the echo: ``sent`` as a peer wrote it
            frame = source.last_frame
            assert frame is not None
            await target.send(JobCancel(comp_id=1, key=1, attempt=0))
            await target.recv()
            target.relay(frame)
            message, received = await target.recv()  # echoed back, checked
            assert message == sent
            assert [bytes(b) for b in received] == buffers
            assert echo.received[-1] == (sent, buffers)
            await target.send(JobCancel(comp_id=1, key=2, attempt=0))
            assert (await target.recv())[0] == JobCancel(comp_id=1, key=2, attempt=0)
            # A large message's memory is not held for a relay.
            await source.send(sent, [b"y" * RELAY_MAX, b""])
            await source.recv()
            assert source.last_frame is None

    run(main())


def test_dispatch_shows_each_small_signed_message_undecoded_first():
    """``dispatch(early=...)`` gets each message's frame before ``handler`` gets the
    message (a relay passes it on first); the frame is the message as it came."""
    sent = [JobCancel(comp_id=1, key=key, attempt=0) for key in range(3)]

    async def main():
        async with (
            serving() as (listener, _),
            client(listener.port) as (conn, _),
        ):
            seen: list[object] = []

            def early(frame, waiting):
                _prefix, count, signed = frame
                header = split_body(signed, count)[0][0]
                seen.append(
                    WireMessage.from_header(unpack_header(header, trusted=True))
                )
                assert waiting >= 0

            def handler(message, buffers):
                seen.append(("handled", message))
                return message.key == 2

            for message in sent:
                conn.write(message)
            await conn.dispatch(handler, early=early)
            assert seen == [item for m in sent for item in (m, ("handled", m))]

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


def test_connect_nothing_listening_raises_connection_closed():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]  # bound but not listening: refused

    async def main():
        with pytest.raises(ConnectionClosedError, match="cannot connect"):
            await connect(HOST, port, secret=SECRET, max_message_size=1024)

    run(main())


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


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


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


# --- a client facing something that is not an honest node -----------------------


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


# --- large messages (hashed while in flight), pipelining, dispatch ----------------


class LowatEcho(Echo):
    """An echo node that reads large frames as a node server does (`read_lowat`)."""

    async def __call__(self, conn: Connection, name: str) -> None:
        conn.read_lowat = READ_LOWAT
        await super().__call__(conn, name)


@pytest.mark.parametrize("echo_type", [Echo, LowatEcho])
@pytest.mark.parametrize("where", ["middle", "mac"])
def test_tampered_large_frame_hashed_in_flight_closes_without_dispatch(
    where, echo_type, caplog
):
    big = os.urandom(3 * 1024 * 1024)  # read in many pieces, hashed as they arrive

    async def main():
        async with (
            serving(handler=echo_type()) as (listener, echo),
            raw_connection(listener.port) as (reader, writer),
        ):
            raw = RawClient(reader, writer)
            await raw.handshake()
            writer.write(
                raw.signed_frame(JobCancel(comp_id=1, key=1, attempt=0), [big])
            )
            message, buffers = await raw.receive()
            assert message.key == 1 and bytes(buffers[0]) == big
            frame = raw.signed_frame(JobCancel(comp_id=1, key=2, attempt=0), [big])
            index = {"middle": len(frame) // 2, "mac": -1}[where]
            writer.write(_flip(frame, index))
            await read_until_closed(reader)
            assert [m.key for m, _ in echo.received] == [1]
            assert warnings_from(caplog, "message 1 failed its MAC check")

    run(main())


@pytest.mark.parametrize(
    "size",
    [
        200_000,  # less than the low-water mark from its start
        3 * 1024 * 1024 + 7,  # several marks, then the rest
    ],
)
def test_large_frames_arriving_in_pieces_then_small_ones_are_all_read(size):
    """A reader with `read_lowat` (a node) is woken while a large frame arrives only
    once enough of it is queued (SO_RCVLOWAT): a frame's last few bytes, and the
    small frames after it, must still wake it (a mark left set would leave them
    unread)."""
    big = os.urandom(size)

    async def main():
        async with (
            serving(handler=LowatEcho()) as (listener, _echo),
            raw_connection(listener.port) as (reader, writer),
        ):
            raw = RawClient(reader, writer)
            await raw.handshake()
            for key in range(2):
                frame = raw.signed_frame(
                    JobCancel(comp_id=1, key=key, attempt=0), [big]
                )
                for piece in (frame[:1000], frame[1000:-3], frame[-3:-1], frame[-1:]):
                    writer.write(piece)
                    await writer.drain()
                message, buffers = await raw.receive()
                assert message.key == key and bytes(buffers[0]) == big
                for small in range(10, 13):
                    sent = JobCancel(comp_id=1, key=small, attempt=0)
                    writer.write(raw.signed_frame(sent, [b"s"]))
                    message, buffers = await raw.receive()
                    assert message.key == small and bytes(buffers[0]) == b"s"

    run(main())


class _Body(bytearray):
    """A frame body that can be watched (weak reference) until it is freed."""


class BodyWatcher(LowatEcho):
    """An echo node that takes large bodies from `take_body` (as a node server's
    memfd pool), keeping a weak reference to each."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[weakref.ref[_Body]] = []

    def _take(self, size: int) -> _Body:
        body = _Body(size)
        self.bodies.append(weakref.ref(body))
        return body

    async def __call__(self, conn: Connection, name: str) -> None:
        conn.decoder.take_body = self._take
        await super().__call__(conn, name)


@pytest.mark.parametrize("read_some", [True, False])
def test_a_peer_hanging_up_mid_frame_leaves_its_body_unreferenced(read_some):
    """A peer stops half-way through a large frame and hangs up: the connection ends
    without a message, and the body the frame was being read (and hashed) into is
    freed at once, though the connection object lives on (it and its link refer to
    each other, so only a garbage collection would free what they hold)."""
    big = os.urandom(3 * 1024 * 1024)

    async def main():
        async with (
            serving(handler=BodyWatcher()) as (listener, echo),
            raw_connection(listener.port) as (reader, writer),
        ):
            raw = RawClient(reader, writer)
            await raw.handshake()
            frame = raw.signed_frame(JobCancel(comp_id=1, key=1, attempt=0), [big])
            cut = len(frame) // 2 if read_some else 100
            writer.write(frame[:cut])
            await writer.drain()
            await wait_until(lambda: bool(echo.bodies))
            (conn,) = echo.connections
            if read_some:
                await wait_until(lambda: conn.decoder.pending > 1024 * 1024)
            writer.close()
            await wait_until(lambda: echo.active == 0)
            assert echo.received == []
            assert conn.closed
            assert [body() for body in echo.bodies] == [None]

    gc.disable()  # the body must go without a collection
    try:
        run(main())
    finally:
        gc.enable()


def test_large_messages_written_without_waiting_arrive_in_order_and_intact():
    payloads = [os.urandom(2 * 1024 * 1024 + key) for key in range(4)]

    async def main():
        async with (
            serving() as (listener, _),
            client(listener.port) as (conn, _),
        ):
            # More than the sockets hold: the rest waits, uncopied, in the queue,
            # with each MAC computed as its message leaves.
            for key, payload in enumerate(payloads):
                conn.write(JobCancel(comp_id=1, key=key, attempt=0), [payload])
                conn.write(JobCancel(comp_id=1, key=100 + key, attempt=0), [b"s"])
            await conn.flush()
            got = []
            for _ in range(2 * len(payloads)):
                message, buffers = await conn.recv()
                got.append((message.key, bytes(buffers[0])))
            assert got == [
                item
                for key, payload in enumerate(payloads)
                for item in ((key, payload), (100 + key, b"s"))
            ]

    run(main())


def test_write_many_signed_small_and_large_messages_arrive_in_order_and_verified():
    large = os.urandom(200_000)  # over the coalescing limit: written on its own
    messages = [
        (JobCancel(comp_id=1, key=1, attempt=0), [b"a"]),
        (JobCancel(comp_id=1, key=2, attempt=0), []),
        (JobCancel(comp_id=1, key=3, attempt=0), [large]),
        (JobCancel(comp_id=1, key=4, attempt=0), [b"d", b"dd"]),
    ]

    async def main():
        async with (
            serving() as (listener, echo),
            client(listener.port) as (conn, _),
        ):
            before = conn.bytes_sent
            conn.write_many(messages)
            await conn.flush()
            got = []
            for _ in messages:
                message, buffers = await conn.recv()
                got.append((message.key, [bytes(b) for b in buffers]))
            assert got == [(m.key, [bytes(b) for b in bs]) for m, bs in messages]
            assert [m.key for m, _ in echo.received] == [1, 2, 3, 4]  # MACs held
            assert conn.bytes_sent - before > len(large)

    run(main())


def test_dispatch_handles_messages_in_order_until_handler_says_stop():
    async def main():
        async with (
            serving() as (listener, _),
            client(listener.port) as (conn, _),
        ):
            for key in range(6):
                conn.write(JobCancel(comp_id=1, key=key, attempt=0))
            seen = []

            def handle(message, buffers):
                seen.append(message.key)
                return message.key == 3

            await conn.dispatch(handle)
            assert seen == [0, 1, 2, 3]
            # What came after the stop is left for the next reader.
            assert (await conn.recv())[0].key == 4
            reader = asyncio.ensure_future(conn.dispatch(handle))
            await asyncio.sleep(0)  # let it start
            with pytest.raises(RuntimeError, match="two readers"):
                await conn.recv()
            conn.close()
            with pytest.raises(ConnectionClosedError):
                await reader

    run(main())


def test_dispatch_raises_handler_error_and_connection_end():
    async def main():
        async with (
            serving() as (listener, echo),
            client(listener.port) as (conn, _),
        ):
            conn.write(JobCancel(comp_id=1, key=1, attempt=0))

            def fail(message, buffers):
                raise ValueError(f"bad {message.key}")

            with pytest.raises(ValueError, match="bad 1"):
                await conn.dispatch(fail)
            await wait_until(lambda: echo.connections)
            echo.connections[0].close()
            with pytest.raises(ConnectionClosedError):
                await conn.dispatch(lambda message, buffers: None)

    run(main())


def test_all_sent_tells_a_peer_that_read_everything_and_hung_up():
    # The node releases kept results once they are sent; a client that read them
    # all may close before the node's flush runs: that is still "sent".
    async def main():
        left, right = socket.socketpair()
        a = Connection.over_socket(left, "a")
        b = Connection.over_socket(right, "b")
        a.write(JobCancel(comp_id=1, key=1, attempt=0), [b"x" * 1000])
        assert a.all_sent  # a small message goes in one sendmsg
        message, buffers = await b.recv()
        assert message.key == 1 and bytes(buffers[0]) == b"x" * 1000
        b.close()
        with pytest.raises(ConnectionClosedError):
            await a.recv()
        assert a.all_sent
        with pytest.raises(ConnectionClosedError):
            await a.flush()

    run(main())


def test_all_sent_is_false_when_bytes_were_dropped():
    async def main():
        left, right = socket.socketpair()
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a = Connection.over_socket(left, "a")
        a.write(JobCancel(comp_id=1, key=1, attempt=0), [os.urandom(4 << 20)])
        assert not a.all_sent  # the kernel took only part of 4 MB
        right.close()
        a.close()
        assert not a.all_sent

    run(main())


def _same_file(fd: int, other: int) -> bool:
    one, two = os.fstat(fd), os.fstat(other)
    return (one.st_dev, one.st_ino) == (two.st_dev, two.st_ino)


def test_descriptors_travel_with_their_message_even_behind_unsent_bytes():
    # A node hands a job's memfd to its worker: the descriptor must reach the worker
    # with that job's message, also when the message waits behind a large one the
    # worker's socket could not take yet.
    from nodeserver.channel import MessageSocket
    from nodeserver.ipc import Run

    files = [os.memfd_create(f"f{i}") for i in range(2)]

    async def main() -> list[tuple[int, int, bool]]:
        left, right = socket.socketpair()
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        right.settimeout(10)
        conn = Connection.over_socket(left, "worker", trusted_max_size=64 << 20)
        reader = MessageSocket(right, fds=True)
        conn.write(Run(key=0, attempt=0), (), (files[0],))  # sent at once
        conn.write(Run(key=1, attempt=0), [os.urandom(8 << 20)])
        assert conn.unsent  # the rest waits for the reader
        conn.write(Run(key=2, attempt=0), (), (files[1],))  # queued behind it
        got = []
        loop = asyncio.get_running_loop()
        for _ in range(3):
            message, _buffers = await loop.run_in_executor(None, reader.recv)
            fd = reader.take_fd() if message.key != 1 else None
            got.append((message.key, fd))
        await conn.flush()
        conn.close()
        reader.close()
        out = []
        for key, fd in got:
            same = fd is not None and _same_file(fd, files[key // 2])
            if fd is not None:
                os.close(fd)
            out.append((key, fd is not None, same))
        return out

    try:
        assert run(main()) == [(0, True, True), (1, False, False), (2, True, True)]
    finally:
        for fd in files:
            os.close(fd)


def test_descriptors_are_refused_on_a_signed_connection():
    async def main():
        left, right = socket.socketpair()
        a = Connection.over_socket(left, "a")
        a.start_signing(b"k" * 32, b"k" * 32, 1 << 20)
        with pytest.raises(ValueError, match="descriptors"):
            a.write(JobCancel(comp_id=1, key=1, attempt=0), (), (0,))
        a.close()
        right.close()

    run(main())


def test_unread_bytes_counts_what_waits_in_the_kernel_until_the_loop_reads_it():
    """What the pulse watchdogs ask before declaring a peer dead: bytes the peer
    sent that the loop has not read yet (its check may come first in a turn)."""

    async def body() -> None:
        ours, theirs = socket.socketpair()
        conn = Connection.over_socket(ours, "peer")
        try:
            assert conn.unread_bytes() == 0
            theirs.sendall(b"\x00" * 5)  # part of a frame header: never a message
            assert conn.unread_bytes() == 5  # the loop had no turn since
            reads = conn.reads
            for _ in range(100):
                if conn.reads != reads:
                    break
                await asyncio.sleep(0.01)
            assert conn.reads == reads + 1
            assert conn.unread_bytes() == 0  # read into the decoder
        finally:
            conn.close()
            theirs.close()
        assert conn.unread_bytes() == 0  # closed: nothing to ask

    run(body())
