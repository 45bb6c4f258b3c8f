"""Attacks on an authenticated connection's frames: bit flips, replays, splices.

A raw client (the sans-IO pieces on a socket) authenticates, then sends frames a real
client never would; the node must drop the connection before dispatching them.
"""

from __future__ import annotations

import pytest

from dispynb.protocol.messages import JobCancel
from tests.asyncutil import run
from tests.transport.util import (
    RawClient,
    echo_round_trip,
    raw_connection,
    read_until_closed,
    serving,
    unsigned_frame,
    warnings_from,
)


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("where", ["mac", "header", "buffer"])
@pytest.mark.attack(
    id="frame-bit-flip",
    title="One bit flipped in a signed frame (its MAC, header or payload) after auth",
    goal="the MAC check fails, the connection is closed, the frame is not dispatched",
)
def test_tampered_frame_after_auth_closes_without_dispatch(where, measure, caplog):
    async def main():
        async with (
            serving() as (listener, echo),
            raw_connection(listener.port) as (reader, writer),
        ):
            raw = RawClient(reader, writer)
            await raw.handshake()
            good = JobCancel(comp_id=1, key=1, attempt=0)
            writer.write(raw.signed_frame(good, [b"payload"]))
            await raw.receive()
            frame = raw.signed_frame(JobCancel(comp_id=1, key=2, attempt=0), [b"data"])
            index = {"mac": -1, "header": 20, "buffer": -33}[where]
            writer.write(_flip(frame, index))
            await read_until_closed(reader)
            assert [m.key for m, _ in echo.received] == [1]
            assert warnings_from(caplog, "failed its MAC check")
            await echo_round_trip(listener.port)

    run(main())
    measure(f"flip in the {where}: closed, 0 tampered frames dispatched")


@pytest.mark.attack(
    id="frame-replay",
    title="A signed frame sent again on the same connection",
    goal="the sequence number makes its MAC fail; closed, not dispatched twice",
)
def test_replayed_frame_after_auth_closes_without_dispatch(measure, caplog):
    async def main():
        async with (
            serving() as (listener, echo),
            raw_connection(listener.port) as (reader, writer),
        ):
            raw = RawClient(reader, writer)
            await raw.handshake()
            frame = raw.signed_frame(JobCancel(comp_id=1, key=1, attempt=0))
            writer.write(frame)
            await raw.receive()
            writer.write(frame)  # the very same bytes again
            await read_until_closed(reader)
            assert len(echo.received) == 1
            assert warnings_from(caplog, "message 1 failed its MAC check")

    run(main())
    measure("replay closed the connection; dispatched once")


@pytest.mark.attack(
    id="unsigned-after-auth",
    title="An unsigned frame injected into an authenticated connection",
    goal="closed without dispatch",
)
def test_unsigned_frame_after_auth_closes_without_dispatch(measure, caplog):
    async def main():
        async with (
            serving() as (listener, echo),
            raw_connection(listener.port) as (reader, writer),
        ):
            raw = RawClient(reader, writer)
            await raw.handshake()
            writer.write(unsigned_frame(JobCancel(comp_id=1, key=1, attempt=0)))
            await read_until_closed(reader)
            assert echo.received == []
            assert warnings_from(caplog, "connection from")

    run(main())
    measure("closed, 0 frames dispatched")


@pytest.mark.attack(
    id="cross-session-splice",
    title="A frame captured on one authenticated connection spliced into another",
    goal="the per-connection keys make its MAC fail; closed without dispatch",
)
def test_frame_signed_with_other_session_key_closes_without_dispatch(measure, caplog):
    async def main():
        async with (
            serving() as (listener, echo),
            raw_connection(listener.port) as (r1, w1),
            raw_connection(listener.port) as (r2, w2),
        ):
            one, two = RawClient(r1, w1), RawClient(r2, w2)
            await one.handshake()
            await two.handshake()
            # A message captured on connection one, replayed on connection two.
            w2.write(one.signed_frame(JobCancel(comp_id=1, key=1, attempt=0)))
            await read_until_closed(r2)
            assert echo.received == []
            assert warnings_from(caplog, "failed its MAC check")

    run(main())
    measure("closed, 0 frames dispatched")
