"""A client that submits big jobs and never reads (issue 13 item 3).

Our own wire client authenticates to a real node subprocess, sets up a computation,
submits 24 jobs that return 40 MiB each, and never reads. The node stops reading
results from its workers while the client's queue is over `OUT_HIGH`, so its memory
stays bounded; once the client reads, every result arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from pathlib import Path

import psutil
import pytest

from dispynb.protocol import serialize
from dispynb.protocol.messages import (
    ComputationReady,
    ComputationSetup,
    JobResults,
    JobSubmit,
    NodeStatus,
)
from nodeserver.outbox import OUT_HIGH
from tests.hostile.tools import limited_node
from tests.transport.certs import make_cert
from tests.transport.util import RawClient

pytestmark = pytest.mark.slow

MiB = 1 << 20
JOBS = 24
RESULT = 40 * MiB
WORKERS = 2

#: Seconds the client does not read while the node's memory is watched.
WATCH = 8.0


def forty_mib(i: int) -> bytes:
    return bytes([i]) * (40 << 20)


#: What the node may hold for one client that does not read: the queue up to
#: OUT_HIGH plus the message that crossed it, one result being read per worker, and
#: allocator slack.
BOUND = OUT_HIGH + RESULT * (WORKERS + 1) + 64 * MiB


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


async def _attack(
    port: int, secret: bytes, node_pid: int, cafile: str | None = None
) -> tuple[int, int, int]:
    context = None if cafile is None else ssl.create_default_context(cafile=cafile)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1" if context else None
    )
    client = RawClient(reader, writer)
    try:
        await client.handshake(secret)
        bundle = serialize.dumps({"func": forty_mib, "setup": None, "setup_args": ()})
        writer.write(
            client.signed_frame(
                ComputationSetup(comp_id=1, name="big", workers=WORKERS), bundle
            )
        )
        message, _ = await asyncio.wait_for(client.receive(), 20)
        assert isinstance(message, ComputationReady), message
        before = _rss(node_pid)
        buffers = []
        for i in range(JOBS):
            buffers.extend(serialize.dumps(((i,), {})))
        entries = [[i, 1, 1] for i in range(JOBS)]
        writer.write(client.signed_frame(JobSubmit(comp_id=1, jobs=entries), buffers))
        await writer.drain()
        # Never read, for a while: watch the node's memory.
        peak = before
        deadline = time.monotonic() + WATCH
        while time.monotonic() < deadline:
            peak = max(peak, _rss(node_pid))
            await asyncio.sleep(0.05)
        # Now read: every result must come.
        got: set[int] = set()
        async with asyncio.timeout(60):
            while len(got) < JOBS:
                message, result_buffers = await client.receive()
                if isinstance(message, JobResults):
                    offset = 0
                    for entry in message.results:
                        key, count = entry[0], entry[-1]
                        value = serialize.loads(result_buffers[offset : offset + count])
                        offset += count
                        assert value == bytes([key]) * RESULT
                        got.add(key)
        return before, peak, len(got)
    finally:
        writer.close()
        # Closed before asyncio.run ends the loop, or the transport is left open.
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 10)


def _check(
    measure, directory: Path, certfile: str | None = None, keyfile: str | None = None
) -> None:
    """Run the attack on a node (over TLS with ``certfile``); measure, assert."""
    tls = () if certfile is None else ("--certfile", certfile, "--keyfile", keyfile)
    with limited_node(directory, *tls, cpus=WORKERS) as node:
        before, peak, delivered = asyncio.run(
            _attack(node.port, node.secret.encode(), node.proc.pid, certfile)
        )
    grown = peak - before
    measure(
        f"node RSS {before / MiB:.0f} -> peak {peak / MiB:.0f} MiB "
        f"(+{grown / MiB:.0f} MiB) while not reading; {delivered}/{JOBS} results "
        "delivered after"
    )
    assert grown < BOUND
    assert delivered == JOBS


@pytest.mark.attack(
    id="never-reading-client",
    title="24 jobs returning 40 MiB each, submitted by a client that never reads",
    goal=f"node RSS growth under {BOUND // MiB} MiB (was +967 MiB); all results "
    "delivered once it reads",
)
def test_a_client_that_never_reads_cannot_grow_the_node(tmp_path, measure):
    _check(measure, tmp_path)


@pytest.mark.attack(
    id="never-reading-tls-client",
    title="The same over TLS: 24 jobs returning 40 MiB each, submitted by a client "
    "that never reads",
    goal=f"node RSS growth under {BOUND // MiB} MiB, as over plain TCP (was +164 to "
    "+227 MiB: asyncio's TLS transport held ciphertext copies it did not count); all "
    "results delivered once it reads",
)
def test_a_tls_client_that_never_reads_cannot_grow_the_node(tmp_path, measure):
    certfile, keyfile = make_cert(tmp_path, "node")
    _check(measure, tmp_path / "node", certfile, keyfile)


# -- pulses for a client that does not read ----------------------------------------

#: Seconds the client does not read, asking for a pulse every `PULSE` s.
STALL = 3.0
PULSE = 0.1


def thirty_two_mib() -> bytes:
    return bytes(32 << 20)


async def _pulses_queued(port: int, secret: bytes) -> int:
    """Pulses the node queued for its client while the client did not read (those
    that came at once after the result it had not read)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = RawClient(reader, writer)
    try:
        await client.handshake(secret)
        bundle = serialize.dumps({"func": thirty_two_mib, "setup": None})
        setup = ComputationSetup(comp_id=1, name="p", workers=1, pulse_interval=PULSE)
        writer.write(client.signed_frame(setup, bundle))
        async with asyncio.timeout(20):
            while not isinstance((await client.receive())[0], ComputationReady):
                pass
        submit = JobSubmit(comp_id=1, jobs=[[0, 1, 1]])
        writer.write(client.signed_frame(submit, serialize.dumps(((), {}))))
        await writer.drain()
        await asyncio.sleep(STALL)  # the attack: not reading (its result waits)
        async with asyncio.timeout(30):
            while not isinstance((await client.receive())[0], JobResults):
                pass
        # What was queued behind the result arrives at once; later pulses come
        # every PULSE s (at most 2 of them within this window).
        queued = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * PULSE):
                while True:
                    queued += isinstance((await client.receive())[0], NodeStatus)
        return queued
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 10)


@pytest.mark.attack(
    id="never-reading-pulses",
    title=f"A client asks for a pulse every {PULSE} s, then does not read for "
    f"{STALL:g} s while its 32 MiB result waits",
    goal="no pulse piles up while the client does not take what was sent (was: one "
    "each time, without end for a client that never reads)",
)
def test_pulses_do_not_pile_up_for_a_client_that_does_not_read(tmp_path, measure):
    with limited_node(tmp_path, cpus=1) as node:
        queued = asyncio.run(_pulses_queued(node.port, node.secret.encode()))
    measure(f"{queued} pulses arrived at once after the result (stalled {STALL:g} s)")
    assert queued <= 3
