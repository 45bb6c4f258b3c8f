"""Attacks before authentication on a node's listener (reliability.md section 2.4).

Each test sends something a dispynb client never would, checks that the node closes
that connection with a warning, runs no code, and still serves a normal client.
"""

from __future__ import annotations

import asyncio
import pickle
import random
import re
import time

import psutil
import pytest

from dispynb.defaults import PRE_AUTH_MAX_FRAME
from dispynb.errors import NodeBusyError
from dispynb.protocol.framing import PREFIX, encode_frames
from dispynb.protocol.handshake import ClientHandshake
from dispynb.protocol.messages import (
    PROTOCOL_VERSION,
    Auth,
    JobCancel,
    Welcome,
    pack_header,
)
from dispynb.transport.admission import MAX_PENDING_PER_SOURCE, Admission
from tests.asyncutil import run
from tests.hostile.tools import attacker_socket
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


GARBAGE = {
    "random bytes": random.Random(1234).randbytes(4096),
    **{
        f"valid prefix + random body {seed}": PREFIX.pack(200, 1)
        + random.Random(seed).randbytes(200)
        for seed in range(5)
    },
    "HTTP request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "TLS ClientHello": bytes.fromhex("16030100a5010000a10303") + bytes(150),
    "EOF at once": b"",
    "one byte": b"\x00",
    "short prefix": b"\x00\x00\x00\x10\x00\x00",
    "EOF mid-frame": PREFIX.pack(100, 1) + b"partial",
    "zero-length frame": PREFIX.pack(0, 0),
    "no buffer table": PREFIX.pack(0, 1),
    "zero buffers": PREFIX.pack(8, 0),
    "short table": PREFIX.pack(4, 2),
}


@pytest.mark.attack(
    id="preauth-garbage",
    title="Garbage for a hello: random bytes, HTTP, TLS hello, bad prefixes, EOF",
    goal="each closed with a warning, nothing dispatched, the next client served",
)
def test_garbage_before_auth_is_refused(measure, caplog):
    async def main() -> float:
        slowest = 0.0
        for data in GARBAGE.values():
            start = time.monotonic()
            await survive(data, caplog, "")
            slowest = max(slowest, time.monotonic() - start)
        return slowest

    slowest = run(main(), timeout=30)
    measure(
        f"{len(GARBAGE)} kinds: all closed with a warning, 0 dispatched, "
        f"next client served (slowest {slowest * 1000:.0f} ms)"
    )


@pytest.mark.attack(
    id="oversized-header",
    title="A frame prefix announcing 4 GiB, or one byte over the 64 KiB pre-auth cap",
    goal="refused on the 8-byte prefix alone, before the body is allocated or read",
)
def test_oversized_prefix_is_refused_before_allocation(measure, caplog):
    async def main() -> float:
        async with (
            serving() as (listener, _),
            raw_connection(listener.port) as (reader, writer),
        ):
            # No EOF and no body: the node must hang up on the prefix alone.
            start = time.monotonic()
            writer.write(PREFIX.pack(2**32 - 1, 1))
            await read_until_closed(reader)
            elapsed = time.monotonic() - start
            assert warnings_from(caplog, f"over the {PRE_AUTH_MAX_FRAME}-byte cap")
            await echo_round_trip(listener.port)
        await survive(PREFIX.pack(PRE_AUTH_MAX_FRAME + 1, 1), caplog, "cap")
        return elapsed

    elapsed = run(main())
    measure(f"closed {elapsed * 1000:.0f} ms after the prefix, no body sent or read")


MSGPACK_BOMBS = [
    b"\x91" * 60_000 + b"\xc0",  # 60000 nested arrays, within the 64 KiB cap
    b"\xdf\xff\xff\xff\xff",  # a map announcing 2**32-1 entries
    b"\xdd\xff\xff\xff\xff",  # an array announcing 2**32-1 items
    b"\xdb\xff\xff\xff\xff",  # a str announcing 4 GiB
    pack_header({"op": "hello", "name": "x" * 10_000}),
    pack_header({"op": "hello", "pad": list(range(1000))}),
]


@pytest.mark.attack(
    id="msgpack-bomb",
    title="msgpack bombs in the hello: deep nesting, 2^32-entry maps, arrays, strings",
    goal="refused by the header decoder's limits without allocating; node serves on",
)
def test_msgpack_bombs_are_refused(measure, caplog):
    async def main() -> None:
        for bomb in MSGPACK_BOMBS:
            await survive(framed(bomb), caplog, "undecodable")

    rss = psutil.Process().memory_info().rss
    run(main(), timeout=30)
    grown = (psutil.Process().memory_info().rss - rss) / 2**20
    measure(f"{len(MSGPACK_BOMBS)} bombs refused; node process grew {grown:.0f} MiB")
    assert grown < 64


@pytest.mark.attack(
    id="preauth-pickle",
    title="A pickle sent before authentication: unframed, as the hello, as a buffer",
    goal="never unpickled: the marker file its loading would create does not appear",
)
def test_pickle_before_auth_is_never_unpickled(measure, tmp_path, caplog):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_CreatesFile(str(marker)))
    hello = ClientHandshake(b"whatever").hello()

    async def main():
        await survive(framed(payload), caplog)
        await survive(payload, caplog)  # not even framed
        await survive(unsigned_frame(hello, [payload]), caplog, "no payload")

    run(main())
    measure(f"3 placements refused, marker file created: {marker.exists()}")
    assert not marker.exists()
    pickle.loads(payload).close()  # control: this payload does run code when loaded
    assert marker.exists()


WRONG_MESSAGES = [
    pack_header({"op": "job-submit", "comp_id": 1, "jobs": []}),
    pack_header(JobCancel(comp_id=1, key=1, attempt=0).to_header()),
    pack_header({"op": "welcome"}),
    pack_header({"op": "no-such-op"}),
    pack_header({"op": "hello"}),
    pack_header({"op": "hello", "version": "1", "role": "client", "nonce": b""}),
    pack_header(["op", "hello"]),
]


@pytest.mark.attack(
    id="preauth-messages",
    title="Work messages (job-submit, cancel...) or malformed hellos before auth",
    goal="refused with an error message; the handler never sees any of them",
)
def test_wrong_messages_before_auth_are_refused_with_an_error(measure, caplog):
    async def main() -> list[bytes]:
        return [await survive(framed(header), caplog) for header in WRONG_MESSAGES]

    replies = run(main(), timeout=30)
    told = sum(1 for reply in replies if b"error" in reply)
    measure(
        f"{len(WRONG_MESSAGES)} kinds refused, {told} answered with an error, 0 run"
    )
    assert told == len(WRONG_MESSAGES)


def test_wrong_protocol_version_is_refused_with_both_versions(caplog):
    hello = ClientHandshake(b"x").hello()
    header = {**hello.to_header(), "version": PROTOCOL_VERSION + 7}
    reply = run_survive(framed(pack_header(header)), caplog)
    assert f"version {PROTOCOL_VERSION + 7}".encode() in reply
    assert f"speaks {PROTOCOL_VERSION}".encode() in reply


@pytest.mark.attack(
    id="wrong-proof",
    title="A client proof made with a guessed secret",
    goal="refused with an 'auth' error; the handler never runs",
)
def test_wrong_proof_is_refused(measure, caplog):
    async def main():
        async with serving() as (listener, echo):
            async with raw_connection(listener.port) as (reader, writer):
                handshake = ClientHandshake(b"guess")
                writer.write(unsigned_frame(handshake.hello()))
                await read_message(reader)  # the challenge: a nonce, no proof
                writer.write(unsigned_frame(Auth(proof=b"\x00" * 32)))
                error, _ = await read_message(reader)
                assert error.op == "error"
                assert error.code == "auth"
                await read_until_closed(reader)
            assert warnings_from(caplog, "proof is wrong")
            assert echo.names == []
            await echo_round_trip(listener.port)

    run(main())
    measure("refused with code 'auth', 0 sessions opened")


@pytest.mark.attack(
    id="handshake-replay",
    title="A real client's hello and proof recorded, then replayed on a new connection",
    goal="refused: the node's fresh nonce makes the recorded proof wrong",
)
def test_replayed_handshake_is_refused(measure, caplog):
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
                confirm, _ = await read_message(reader)
                handshake.on_confirm(confirm)
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
    measure("replay refused with code 'auth'; 1 session (the genuine one) opened")


def _verifier(handshake: ClientHandshake):
    from dispynb.protocol.auth import MessageVerifier

    return MessageVerifier(handshake.keys()[1])


def test_one_source_gets_only_its_share_of_pending_handshakes(caplog):
    async def main():
        async with serving() as (listener, _):
            idle = [
                attacker_socket(listener.port) for _ in range(MAX_PENDING_PER_SOURCE)
            ]
            try:
                await wait_until(lambda: listener._pending == MAX_PENDING_PER_SOURCE)
                extra = attacker_socket(listener.port)
                with extra:
                    reply = await asyncio.to_thread(extra.recv, 4096)
                assert b"busy" in reply and b"from your address" in reply
                await echo_round_trip(listener.port)  # 127.0.0.1 still gets in
            finally:
                for sock in idle:
                    sock.close()
            await wait_until(lambda: listener._pending == 0)
        assert warnings_from(caplog, "refused connections from 127.0.0.2")

    run(main())


def test_a_busy_node_is_retried_until_a_slot_frees(caplog):
    """A client refused as busy (its address's share held: the idle connections come
    from its own address, or they would give way to it) retries until one frees."""

    async def main():
        admission = Admission(max_pending=2, max_pending_per_source=2)
        async with serving(admission=admission) as (listener, _):
            idle = [attacker_socket(listener.port, "127.0.0.1") for _ in range(2)]
            await wait_until(lambda: listener._pending == 2)
            asyncio.get_running_loop().call_later(
                0.3, lambda: [s.close() for s in idle]
            )
            start = time.monotonic()
            await echo_round_trip(listener.port)
            assert time.monotonic() - start >= 0.25
            with pytest.raises(NodeBusyError, match=r"retrying for 0\.2 s"):
                idle = [attacker_socket(listener.port, "127.0.0.1") for _ in range(2)]
                await wait_until(lambda: listener._pending == 2)
                try:
                    await echo_round_trip(listener.port, retry_for=0.2)
                finally:
                    for sock in idle:
                        sock.close()

    run(main())


async def _drip(writer: asyncio.StreamWriter) -> None:
    for byte in PREFIX.pack(1000, 1):
        writer.write(bytes([byte]))
        await asyncio.sleep(0.05)
    while True:
        writer.write(b"x")
        await asyncio.sleep(0.05)


@pytest.mark.attack(
    id="slowloris",
    title="Slowloris: connections silent, or dripping a byte every 50 ms, at hello",
    goal="closed at the handshake deadline; clients are served meanwhile",
)
def test_slowloris_is_closed_at_the_handshake_deadline(measure, caplog):
    async def main() -> tuple[float, float]:
        async with serving(handshake_timeout=0.5) as (listener, _):
            async with raw_connection(listener.port) as (reader, writer):
                writer.write(b"\x00\x00")  # stalls mid-prefix...
                await echo_round_trip(listener.port)  # ...others are served
                start = time.monotonic()
                await asyncio.wait_for(read_until_closed(reader), 5)
                silent = time.monotonic() - start
            async with raw_connection(listener.port) as (reader, writer):
                dripper = asyncio.ensure_future(_drip(writer))
                try:
                    start = time.monotonic()
                    await asyncio.wait_for(read_until_closed(reader), 5)
                    dripping = time.monotonic() - start
                finally:
                    dripper.cancel()
            await echo_round_trip(listener.port)
            return silent, dripping

    silent, dripping = run(main())
    # Logged as counts: the first at once, the second in the summary at stop.
    first = r"rejected connections from 127\.0\.0\.1:\d+: handshake timed out"
    assert any(re.match(first, w) for w in warnings_from(caplog, "timed out"))
    assert warnings_from(caplog, "rejected connections: 1 more from 1 source in")
    measure(
        f"deadline 0.5 s: silent closed after {silent:.2f} s, dripping after "
        f"{dripping:.2f} s; a client was served meanwhile"
    )
    assert silent < 3 and dripping < 3
