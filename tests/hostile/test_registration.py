"""Attacks on a launcher's registration listener (`dispynb.deploy.registry`): without
the secret nobody makes the client connect anywhere, and a flood from one address
does not keep the launched nodes out."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from dispynb.deploy.registry import MAX_PENDING_PER_SOURCE, RegisteredNode, Registrar
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
        challenged = 0
        for _ in range(500):
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((ATTACKER, 0))
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock)
            held.append((reader, writer))
        for reader, _ in held:
            data = await asyncio.wait_for(reader.read(2), 5)
            challenged += bool(data)
        start = time.monotonic()
        await register(f"127.0.0.1:{port}", secret=SECRET, name="real", port=9, cpus=1)
        took = time.monotonic() - start
        for _, writer in held:
            writer.close()
        registrar.close()
        return challenged, took

    challenged, took = run(main(), timeout=60)
    measure(
        f"{challenged} of 500 held connections read (challenged), the rest closed at "
        f"once; the node registered in {took * 1000:.0f} ms"
    )
    assert challenged <= MAX_PENDING_PER_SOURCE
    assert [node.name for node in found] == ["real"]
    assert took < 2
