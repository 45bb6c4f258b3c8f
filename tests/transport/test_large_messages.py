"""Large messages (hashed while in flight), pipelining, relaying and dispatch over
authenticated connections on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import os
import weakref

import pytest

from dispynb.errors import (
    ConnectionClosedError,
)
from dispynb.protocol.framing import split_body
from dispynb.protocol.messages import (
    JobCancel,
    JobSubmit,
    WireMessage,
    unpack_header,
)
from dispynb.transport.connection import Connection
from dispynb.transport.inbox import RELAY_MAX
from dispynb.transport.links import READ_LOWAT
from tests.asyncutil import run
from tests.transport.util import (
    Echo,
    RawClient,
    client,
    raw_connection,
    read_until_closed,
    serving,
    wait_until,
    warnings_from,
)


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


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


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
