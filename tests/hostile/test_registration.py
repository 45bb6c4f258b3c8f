"""Attacks on a launcher's registration listener (`dispynb.deploy.registry`): without
the secret nobody makes the client connect anywhere, and a flood from one address
does not keep the launched nodes out."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from dispynb.deploy.registry import (
    MAX_PENDING,
    MAX_PENDING_PER_SOURCE,
    MAX_REMEMBERED,
    RegisteredNode,
    Registrar,
)
from dispynb.protocol.discovery import new_boot_id
from dispynb.protocol.registration import (
    ACCEPTED,
    Registration,
    decode_challenge,
    encode_registration,
    sign,
)
from nodeserver.register import register
from tests.asyncutil import run
from tests.hostile.tools import ATTACKER

SECRET = os.urandom(32)


async def _answer(
    port: int, make: object, source: str = ATTACKER
) -> tuple[bytes, bytes]:
    """Connect from ``source``, read the nonce, send ``make(nonce)``; return
    (nonce, the registrar's answer or b"")."""
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        size = int.from_bytes(await reader.readexactly(2), "big")
        nonce = decode_challenge(await reader.readexactly(size)).nonce
        writer.write(make(nonce))  # type: ignore[operator]
        await writer.drain()
        return nonce, await reader.read(1)
    finally:
        writer.close()


@pytest.mark.attack(
    id="registration-forgery",
    title="Registrations without the secret: forged and replayed proofs, garbage, "
    "pointing the client at a listening victim port",
    goal="the client never connects to the victim; a real node registers after",
)
def test_forged_registrations_never_make_the_client_connect(measure) -> None:
    found: list[RegisteredNode] = []

    async def main() -> tuple[int, int]:
        accepted = 0

        def victim_connected(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            nonlocal accepted
            accepted += 1
            writer.close()

        victim = await asyncio.start_server(victim_connected, ATTACKER, 0)
        victim_port = victim.sockets[0].getsockname()[1]
        # A node proved itself once: the attacker captured its nonce and proof.
        registrar = Registrar(SECRET, found.append, host="127.0.0.1", timeout=2)
        port = await registrar.start()
        real = Registration(name="n", port=victim_port, cpus=1, boot=new_boot_id())
        captured_nonce, _ = await _answer(
            port, lambda n: encode_registration(sign(SECRET, n, real)), "127.0.0.1"
        )
        captured = encode_registration(sign(SECRET, captured_nonce, real))
        found.clear()
        random_proof = Registration(
            name="n", port=victim_port, cpus=1, boot=new_boot_id(), proof=os.urandom(32)
        )
        attempts = 0
        for make in (
            lambda n: captured,  # replayed on a new nonce
            lambda n: encode_registration(sign(b"guess", n, real)),  # wrong secret
            lambda n: encode_registration(
                Registration(name="n", port=victim_port, cpus=1, boot=new_boot_id())
            ),  # no proof at all
            lambda n: encode_registration(random_proof),  # a random proof
            lambda n: b"\x00\x10" + os.urandom(16),  # garbage
        ):
            for _ in range(20):
                attempts += 1
                _, answer = await _answer(port, make)
                assert answer != ACCEPTED
        # A node with the secret still registers.
        await register(f"127.0.0.1:{port}", secret=SECRET, name="real", port=9, cpus=1)
        registrar.close()
        victim.close()
        return attempts, accepted

    attempts, accepted = run(main(), timeout=60)
    measure(
        f"{attempts} forged/replayed/garbage registrations: {len(found) - 1} accepted, "
        f"{accepted} connections to the victim; the real node registered"
    )
    assert accepted == 0
    assert [node.name for node in found] == ["real"]


@pytest.mark.attack(
    id="registration-flood",
    title="500 connections held open on the registration port from one address",
    goal="at most 8 read at once; a node registers within 2 s",
)
def test_flood_from_one_address_does_not_keep_nodes_out(measure) -> None:
    found: list[RegisteredNode] = []

    async def main() -> tuple[int, float]:
        registrar = Registrar(SECRET, found.append, host="127.0.0.1", timeout=10)
        port = await registrar.start()
        held = []
        for _ in range(500):
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((ATTACKER, 0))
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock)
            held.append((reader, writer))
        for reader, _ in held:  # each one challenged: the registrar took them all
            await asyncio.wait_for(reader.read(2), 5)
        # Each connection beyond 8 dropped the oldest: 8 are being read.
        pending = registrar._pending
        start = time.monotonic()
        await register(f"127.0.0.1:{port}", secret=SECRET, name="real", port=9, cpus=1)
        took = time.monotonic() - start
        for _, writer in held:
            writer.close()
        registrar.close()
        await registrar.wait_closed()
        return pending, took

    pending, took = run(main(), timeout=60)
    measure(
        f"{pending} of 500 held connections being read, each older one dropped as a "
        f"newer came; the node registered in {took * 1000:.0f} ms"
    )
    assert pending == MAX_PENDING_PER_SOURCE
    assert [node.name for node in found] == ["real"]
    assert took < 2


@pytest.mark.attack(
    id="registration-crowding",
    title="Every registration slot held: 8 connections from each of 31 addresses and "
    "8 from the node's own address, each reopened as soon as it is dropped",
    goal="a node registers within 2 s; one warning line per address",
)
def test_crowding_every_slot_does_not_keep_nodes_out(
    measure, caplog: pytest.LogCaptureFixture
) -> None:
    """An attacker with a few addresses (a LAN, an IPv6 /64) or on the node's own
    machine held every pending slot (256 in all, 8 per address): each new
    connection, the node's included, was closed at once, so the node never
    registered. The oldest pending registration of the address holding the most now
    makes room for a new one: an attacker must open connections faster than a node
    completes its exchange to keep it out."""
    found: list[RegisteredNode] = []
    sources = [f"127.0.2.{i}" for i in range(1, 32)] * MAX_PENDING_PER_SOURCE
    sources += ["127.0.0.1"] * MAX_PENDING_PER_SOURCE  # the node's own address
    assert len(sources) == MAX_PENDING

    async def hold(port: int, source: str, stop: asyncio.Event) -> int:
        """Keep a connection from ``source`` open; reopen it when dropped."""
        opened = 0
        while not stop.is_set():
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((source, 0))
            try:
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            except OSError:
                sock.close()
                await asyncio.sleep(0.01)
                continue
            opened += 1
            reader, writer = await asyncio.open_connection(sock=sock)
            read = asyncio.ensure_future(reader.read())  # until dropped
            await asyncio.wait([read, asyncio.ensure_future(stop.wait())],
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            read.cancel()
            writer.close()
        return opened

    async def main() -> tuple[float, int]:
        registrar = Registrar(SECRET, found.append, host="127.0.0.1", timeout=10)
        port = await registrar.start()
        stop = asyncio.Event()
        holders = []
        try:
            # Every slot taken (the registrar reads them all), 50 at a time: a burst
            # overflows the listen backlog, and the SYNs dropped are sent again late.
            deadline = time.monotonic() + 20
            for first in range(0, len(sources), 50):
                batch = sources[first : first + 50]
                holders += [asyncio.ensure_future(hold(port, s, stop)) for s in batch]
                while registrar._pending < len(holders):
                    assert time.monotonic() < deadline, registrar._pending
                    await asyncio.sleep(0.01)
            start = time.monotonic()
            await register(
                f"127.0.0.1:{port}", secret=SECRET, name="real", port=9, cpus=1,
                patience=5,
            )  # fmt: skip
            took = time.monotonic() - start
        finally:
            stop.set()
            opened = sum(await asyncio.gather(*holders))
            registrar.close()
            await registrar.wait_closed()
        return took, opened

    with caplog.at_level("DEBUG", logger="dispynb.deploy.registry"):
        took, opened = run(main(), timeout=60)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    measure(
        f"{len(sources)} connections held ({opened} opened in all); the node "
        f"registered in {took * 1000:.0f} ms; {len(warnings)} warning line(s)"
    )
    assert [node.name for node in found] == ["real"]
    assert took < 2
    assert len(warnings) <= 32, [r.getMessage() for r in warnings]


@pytest.mark.attack(
    id="registration-log-flood",
    title="Failed registrations from 1,100 source addresses (an IPv6 /64 has more)",
    goal="a warning line for each of the first 1,024 addresses, one saying the rest "
    "go to debug level, none after",
)
def test_refusals_from_endless_addresses_do_not_flood_the_log(
    measure, caplog: pytest.LogCaptureFixture
) -> None:
    """Refusals were logged once per address for the first 1,024 addresses, and
    every refusal from any address after those at warning level: an attacker with
    an IPv6 prefix could fill the user's log (a notebook's cell output) at will."""
    sources = [f"127.0.{3 + i // 250}.{1 + i % 250}" for i in range(1100)]

    async def main() -> None:
        registrar = Registrar(SECRET, lambda node: None, host="127.0.0.1", timeout=5)
        port = await registrar.start()
        for source in sources:
            _, answer = await _answer(port, lambda n: b"\x00\x10" + bytes(16), source)
            assert answer != ACCEPTED
        registrar.close()
        await registrar.wait_closed()

    with caplog.at_level("WARNING", logger="dispynb.deploy.registry"):
        run(main(), timeout=60)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    measure(f"{len(sources)} addresses refused: {len(warnings)} warning lines")
    assert len(warnings) == MAX_REMEMBERED + 1, len(warnings)
    assert "logged at debug level only" in warnings[-1]
