"""Hostile input to a node's listener (reliability.md section 2.4, items 1-5, 12, 13).

Each test sends something a dispynb client never would, checks that the node closes
that connection with a warning, runs no code, and still serves a normal client.
"""

from __future__ import annotations

import asyncio
import pickle
import random
import time

import pytest

from dispynb.defaults import PRE_AUTH_MAX_FRAME
from dispynb.protocol.framing import PREFIX, encode_frames
from dispynb.protocol.handshake import ClientHandshake
from dispynb.protocol.messages import (
    PROTOCOL_VERSION,
    Auth,
    JobCancel,
    Welcome,
    pack_header,
)
from dispynb.transport.listener import MAX_PENDING_HANDSHAKES
from tests.asyncutil import run
from tests.transport.util import (
    echo_round_trip,
    raw_connection,
    read_message,
    read_until_closed,
    send_and_half_close,
    serving,
    unsigned_frame,
    wait_until,
    warnings_from,
)


class _CreatesFile:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def framed(*buffers: bytes) -> bytes:
    head, parts = encode_frames(list(buffers))
    return b"".join([head, *parts])


async def survive(data: bytes, caplog, warning: str = "rejected connection") -> bytes:
    """Send ``data`` and EOF; wait for the node to hang up; check it still serves."""
    async with serving() as (listener, echo):
        async with raw_connection(listener.port) as (reader, writer):
            await send_and_half_close(writer, data)
            reply = await read_until_closed(reader)
        assert warnings_from(caplog, warning)
        assert echo.names == []
        await echo_round_trip(listener.port)
        return reply


def run_survive(data: bytes, caplog, warning: str = "rejected connection") -> bytes:
    return run(survive(data, caplog, warning))


def test_hostile_random_bytes_rejected(caplog):
    data = random.Random(1234).randbytes(4096)
    assert run_survive(data, caplog) == b""


@pytest.mark.parametrize("seed", range(5))
def test_hostile_random_bytes_after_valid_prefix_rejected(seed, caplog):
    rng = random.Random(seed)
    body = rng.randbytes(200)
    run_survive(PREFIX.pack(len(body), 1) + body, caplog)


def test_hostile_http_request_rejected(caplog):
    run_survive(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", caplog, "cap")


def test_hostile_tls_client_hello_to_plain_port_rejected(caplog):
    hello = bytes.fromhex("16030100a5010000a10303") + bytes(150)
    run_survive(hello, caplog, "cap")


def test_hostile_prefix_announcing_4_gib_rejected_at_once(caplog):
    async def main():
        async with (
            serving() as (listener, _),
            raw_connection(listener.port) as (reader, writer),
        ):
            # No EOF and no body: the node must hang up on the prefix alone.
            writer.write(PREFIX.pack(2**32 - 1, 1))
            await read_until_closed(reader)
            assert warnings_from(caplog, f"over the {PRE_AUTH_MAX_FRAME}-byte cap")
            await echo_round_trip(listener.port)

    run(main())


def test_hostile_prefix_just_over_pre_auth_cap_rejected(caplog):
    run_survive(PREFIX.pack(PRE_AUTH_MAX_FRAME + 1, 1), caplog, "cap")


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"\x00\x00\x00\x10\x00\x00", PREFIX.pack(100, 1) + b"partial"],
    ids=["nothing", "one-byte", "short-prefix", "mid-frame"],
)
def test_hostile_eof_before_whole_frame_rejected(data, caplog):
    run_survive(data, caplog, "closed")


@pytest.mark.parametrize(
    "prefix",
    [PREFIX.pack(0, 0), PREFIX.pack(0, 1), PREFIX.pack(8, 0), PREFIX.pack(4, 2)],
    ids=["zero-length", "no-table", "zero-count", "short-table"],
)
def test_hostile_invalid_prefix_rejected(prefix, caplog):
    run_survive(prefix, caplog, "frame")


def test_hostile_slowloris_silent_closed_by_handshake_deadline(caplog):
    async def main():
        async with serving(handshake_timeout=0.5) as (listener, _):
            async with raw_connection(listener.port) as (reader, _):
                start = time.monotonic()
                await asyncio.wait_for(read_until_closed(reader), 5)
                elapsed = time.monotonic() - start
            assert elapsed < 3
            assert warnings_from(caplog, "timed out")
            await echo_round_trip(listener.port)

    run(main())


def test_hostile_slowloris_dripping_bytes_closed_by_handshake_deadline(caplog):
    async def drip(writer):
        for byte in PREFIX.pack(1000, 1):
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)
        while True:
            writer.write(b"x")
            await asyncio.sleep(0.05)

    async def main():
        async with serving(handshake_timeout=0.5) as (listener, _):
            async with raw_connection(listener.port) as (reader, writer):
                dripper = asyncio.ensure_future(drip(writer))
                try:
                    await asyncio.wait_for(read_until_closed(reader), 5)
                finally:
                    dripper.cancel()
            assert warnings_from(caplog, "timed out")
            await echo_round_trip(listener.port)

    run(main())


def test_hostile_pickle_in_hello_position_never_unpickled(tmp_path, caplog):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_CreatesFile(str(marker)))

    async def main():
        await survive(framed(payload), caplog)
        await survive(payload, caplog)  # not even framed

    run(main())
    assert not marker.exists()
    pickle.loads(payload).close()  # control: this payload does run code when loaded
    assert marker.exists()


def test_hostile_pickle_as_hello_payload_buffer_never_unpickled(tmp_path, caplog):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_CreatesFile(str(marker)))
    hello = ClientHandshake(b"whatever").hello()
    run_survive(unsigned_frame(hello, [payload]), caplog, "no payload")
    assert not marker.exists()


def test_hostile_msgpack_bomb_deep_nesting_rejected(caplog):
    bomb = b"\x91" * 60_000 + b"\xc0"  # 60000 nested arrays, within the 64 KiB cap
    run_survive(framed(bomb), caplog, "undecodable message header: StackError")


@pytest.mark.parametrize(
    "header",
    [
        b"\xdf\xff\xff\xff\xff",  # a map announcing 2**32-1 entries
        b"\xdd\xff\xff\xff\xff",  # an array announcing 2**32-1 items
        b"\xdb\xff\xff\xff\xff",  # a str announcing 4 GiB
        pack_header({"op": "hello", "name": "x" * 10_000}),
        pack_header({"op": "hello", "pad": list(range(1000))}),
    ],
    ids=["map32", "array32", "str32", "long-string", "long-array"],
)
def test_hostile_msgpack_oversized_values_rejected(header, caplog):
    run_survive(framed(header), caplog, "undecodable")


@pytest.mark.parametrize(
    "header",
    [
        pack_header({"op": "job-submit", "comp_id": 1, "jobs": []}),
        pack_header({"op": "welcome"}),
        pack_header({"op": "no-such-op"}),
        pack_header({"op": "hello"}),
        pack_header({"op": "hello", "version": "1", "role": "client", "nonce": b""}),
        pack_header(["op", "hello"]),
    ],
    ids=["wrong-state", "incomplete", "unknown-op", "no-fields", "bad-type", "list"],
)
def test_hostile_wrong_messages_before_auth_refused_with_error(header, caplog):
    reply = run_survive(framed(header), caplog)
    assert reply  # the node said why before hanging up
    assert b"error" in reply


def test_hostile_wrong_protocol_version_refused_with_both_versions(caplog):
    hello = ClientHandshake(b"x").hello()
    header = {**hello.to_header(), "version": PROTOCOL_VERSION + 7}
    reply = run_survive(framed(pack_header(header)), caplog)
    assert f"version {PROTOCOL_VERSION + 7}".encode() in reply
    assert f"speaks {PROTOCOL_VERSION}".encode() in reply


def test_hostile_wrong_proof_refused_with_auth_error(caplog):
    async def main():
        async with serving() as (listener, echo):
            async with raw_connection(listener.port) as (reader, writer):
                handshake = ClientHandshake(b"guess")
                writer.write(unsigned_frame(handshake.hello()))
                await read_message(reader)  # the challenge, whose proof we ignore
                writer.write(unsigned_frame(Auth(proof=b"\x00" * 32)))
                error, _ = await read_message(reader)
                assert error.op == "error"
                assert error.code == "auth"
                await read_until_closed(reader)
            assert warnings_from(caplog, "proof is wrong")
            assert echo.names == []
            await echo_round_trip(listener.port)

    run(main())


def test_hostile_replayed_handshake_refused(caplog):
    async def main():
        async with serving() as (listener, echo):
            # Capture a real client's hello and auth on a first connection...
            async with raw_connection(listener.port) as (reader, writer):
                handshake = ClientHandshake(b"transport-test-secret")
                hello = unsigned_frame(handshake.hello())
                writer.write(hello)
                challenge, _ = await read_message(reader)
                auth = unsigned_frame(handshake.on_challenge(challenge))
                writer.write(auth)
                welcome, _ = await read_message(reader, _verifier(handshake))
                assert isinstance(welcome, Welcome)
            # ...and replay them on a second one: the node's nonce is new.
            async with raw_connection(listener.port) as (reader, writer):
                writer.write(hello)
                await read_message(reader)
                writer.write(auth)
                error, _ = await read_message(reader)
                assert error.code == "auth"
                await read_until_closed(reader)
            assert warnings_from(caplog, "proof is wrong")
            await wait_until(lambda: len(echo.names) == 1)

    run(main())


def _verifier(handshake: ClientHandshake):
    from dispynb.protocol.auth import MessageVerifier

    return MessageVerifier(handshake.keys()[1])


def test_hostile_too_many_pending_handshakes_dropped_at_accept(caplog):
    async def main():
        async with serving() as (listener, _):
            idle = []
            try:
                for _ in range(MAX_PENDING_HANDSHAKES):
                    idle.append(
                        await asyncio.open_connection("127.0.0.1", listener.port)
                    )
                await wait_until(lambda: listener._pending == MAX_PENDING_HANDSHAKES)
                async with raw_connection(listener.port) as (reader, _):
                    assert await read_until_closed(reader) == b""
                assert warnings_from(caplog, "too many pending handshakes")
            finally:
                for _, writer in idle:
                    writer.close()
                for _, writer in idle:
                    await writer.wait_closed()
            await wait_until(lambda: listener._pending == 0)
            await echo_round_trip(listener.port)

    run(main())


def test_hostile_valid_client_unaffected_while_slowloris_pending(caplog):
    async def main():
        async with (
            serving() as (listener, _),
            raw_connection(listener.port) as (_, writer),
        ):
            writer.write(b"\x00\x00")  # stalls mid-prefix
            await echo_round_trip(listener.port)
            await echo_round_trip(listener.port)

    run(main())


def test_hostile_message_to_handler_never_dispatched_before_auth(caplog):
    frame = framed(pack_header(JobCancel(comp_id=1, key=1, attempt=0).to_header()))

    async def main():
        async with serving() as (listener, echo):
            async with raw_connection(listener.port) as (reader, writer):
                await send_and_half_close(writer, frame)
                await read_until_closed(reader)
            assert echo.received == []
            assert warnings_from(caplog, "expected 'hello'")

    run(main())
