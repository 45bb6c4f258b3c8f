"""Node registration: the protocol, the client's `Registrar` against raw and hostile
peers, and a real ``dispynb-node --register`` process."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Callable

import pytest

from dispynb.deploy.registry import RegisteredNode, Registrar
from dispynb.errors import DispynbError
from dispynb.protocol.discovery import new_boot_id
from dispynb.protocol.registration import (
    ACCEPTED,
    REJECTED,
    Registration,
    RegistrationError,
    decode_challenge,
    decode_registration,
    encode_challenge,
    encode_registration,
    new_challenge,
    sign,
    verify,
)
from dispynb.transport.addressing import format_address
from nodeserver.register import keep_registered, register
from tests.asyncutil import run
from tests.nodeproc import node_env

SECRET = b"registration-test-secret-0123456789"


def _registration(port: int = 9000) -> Registration:
    return Registration(name="n1", port=port, cpus=2, boot=new_boot_id())


def test_proof_binds_nonce_and_fields() -> None:
    nonce, other = b"a" * 32, b"b" * 32
    signed = sign(SECRET, nonce, _registration())
    assert verify(SECRET, nonce, signed)
    assert not verify(SECRET, other, signed)  # no replay on another challenge
    assert not verify(b"other secret", nonce, signed)
    moved = Registration(
        name=signed.name, port=1234, cpus=signed.cpus, boot=signed.boot,
        proof=signed.proof,
    )  # fmt: skip
    assert not verify(SECRET, nonce, moved)  # the port cannot be changed in transit
    decoded = decode_registration(encode_registration(signed)[2:])
    assert decoded == signed
    assert SECRET not in encode_registration(signed)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xc1", b"\x90", b"\x81\xa5magic\xa3bad", b"\xff" * 600],
)
def test_malformed_messages_are_refused(payload: bytes) -> None:
    with pytest.raises(RegistrationError):
        decode_registration(payload)
    with pytest.raises(RegistrationError):
        decode_challenge(payload)


async def _exchange(port: int, secret: bytes, *, reg: Registration | None = None,
                    send: bytes | None = None,
                    host: str = "127.0.0.1") -> tuple[bytes, bytes]:  # fmt: skip
    """Act as a node: read the challenge, answer; return (nonce, client's answer)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        size = int.from_bytes(await reader.readexactly(2), "big")
        nonce = decode_challenge(await reader.readexactly(size)).nonce
        if send is None:
            send = encode_registration(sign(secret, nonce, reg or _registration()))
        writer.write(send)
        await writer.drain()
        return nonce, await reader.read(1)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("listen", "peer"),
    [("127.0.0.1", "127.0.0.1"), (None, "::1")],  # None: IPv4 and IPv6, one port
)
def test_registrar_accepts_a_valid_proof_and_refuses_others(
    listen: str | None, peer: str
) -> None:
    found: list[RegisteredNode] = []

    async def scenario() -> None:
        registrar = Registrar(SECRET, found.append, host=listen)
        port = await registrar.start()
        try:
            # A wrong secret: refused, nothing reported.
            _, answer = await _exchange(port, b"not the secret", host=peer)
            assert answer == REJECTED and not found
            # A proof captured on one connection is worthless on the next one.
            reg = _registration(9100)
            nonce, answer = await _exchange(port, SECRET, reg=reg, host=peer)
            assert answer == ACCEPTED and [n.port for n in found] == [9100]
            replay = encode_registration(sign(SECRET, nonce, reg))
            _, answer = await _exchange(port, SECRET, send=replay, host=peer)
            assert answer == REJECTED and len(found) == 1
            # Garbage, and an oversized length prefix: closed, nothing reported.
            garbage = [b"\x00\x05hello", b"\xff\xff" + b"x" * 100]
            for send in garbage:
                _, answer = await _exchange(port, SECRET, send=send, host=peer)
                assert answer == b""
            assert len(found) == 1
            node = found[0]
            assert (node.host, node.name, node.cpus) == (peer, "n1", 2)
            assert node.spec == format_address(peer, 9100)
        finally:
            registrar.close()

    run(scenario())


def test_repeats_are_not_news_and_restarts_are_remembered_once_per_address() -> None:
    """Nodes register again while they have no session: a repeat of a boot is not
    reported, a new boot at the same address (the node restarted) is, and the
    registrar keeps one boot per address however often its nodes restart."""
    found: list[RegisteredNode] = []

    async def scenario() -> None:
        registrar = Registrar(SECRET, found.append, host="127.0.0.1")
        port = await registrar.start()
        try:
            boots = [new_boot_id() for _ in range(5)]
            for boot in boots:
                for _ in range(2):  # the boot, then a repeat of it
                    reg = Registration(name="n1", port=9400, cpus=2, boot=boot)
                    _, answer = await _exchange(port, SECRET, reg=reg)
                    assert answer == ACCEPTED
            other = Registration(name="n2", port=9401, cpus=1, boot=boots[0])
            assert (await _exchange(port, SECRET, reg=other))[1] == ACCEPTED
            assert [n.boot for n in found] == [*boots, boots[0]]
            assert [n.port for n in found] == [9400] * 5 + [9401]
            assert len(registrar._boots) == 2  # one per address, not per restart
        finally:
            registrar.close()

    run(scenario())


def test_silent_peer_times_out_and_others_still_register() -> None:
    found: list[RegisteredNode] = []

    async def scenario() -> None:
        registrar = Registrar(SECRET, found.append, host="127.0.0.1", timeout=0.5)
        port = await registrar.start()
        try:
            silent = [
                await asyncio.open_connection("127.0.0.1", port) for _ in range(5)
            ]
            _, answer = await _exchange(port, SECRET)
            assert answer == ACCEPTED and len(found) == 1
            for reader, writer in silent:  # closed by the registrar after its timeout
                data = await asyncio.wait_for(reader.read(), 5)  # challenge, then EOF
                assert data and reader.at_eof()
                writer.close()
        finally:
            registrar.close()

    run(scenario())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("listen", "client"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),  # IPv6: dispynb-node --register [::1]:PORT
        (None, "::1"),  # the default listener: IPv4 and IPv6 on one port
        (None, "127.0.0.1"),
    ],
)
def test_node_registers_and_stops_when_stdin_closes(
    listen: str | None, client: str
) -> None:
    """A real ``dispynb-node --register`` with the secret on stdin."""
    found: list[RegisteredNode] = []

    async def scenario() -> None:
        registrar = Registrar(SECRET, found.append, host=listen)
        port = await registrar.start()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nodeserver", "--secret-stdin", "--parent-pipe",
            "0", "--register", format_address(client, port), "--host", client,
            "--port", "0", "--no-discovery", "--name", "launched-1", "--cpus", "1",
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=node_env(),
        )  # fmt: skip
        try:
            assert proc.stdin is not None
            proc.stdin.write(SECRET + b"\n")
            while not found:
                assert proc.returncode is None
                await asyncio.sleep(0.05)
            node = found[0]
            assert (node.name, node.cpus, node.host) == ("launched-1", 1, client)
            assert node.spec == format_address(client, node.port)
            # The node listens where it registered (connectable).
            _, writer = await asyncio.open_connection(node.host, node.port)
            writer.close()
            proc.stdin.close()  # the launcher is gone: the node stops
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        finally:
            registrar.close()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    run(scenario(), timeout=40)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_node_whose_launcher_goes_as_it_registers_stops() -> None:
    """The launcher closes the node's stdin as it accepts the registration (a
    notebook's %dispy close, or a Ctrl-C, while a node registers): the node must
    still stop. It logged 'the process that started this node exited; stopping',
    then stayed up for ever, registering again every 5 s and deaf to SIGTERM: on
    Python 3.11 `asyncio.wait_for` swallows a cancellation that comes as what it
    awaits completes, so the registration task went on and the node waited for it.
    An orphan node server on the SSH host each time (5 in 5 runs)."""
    ended: list[int | None] = []

    async def scenario() -> None:
        node: list[asyncio.subprocess.Process] = []

        async def accept(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            challenge = new_challenge()
            writer.write(encode_challenge(challenge))
            size = int.from_bytes(await reader.readexactly(2), "big")
            reg = decode_registration(await reader.readexactly(size))
            assert verify(SECRET, challenge.nonce, reg)
            writer.write(ACCEPTED)  # and at once the launcher is gone
            assert node[0].stdin is not None
            node[0].stdin.close()
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        for _ in range(3):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "nodeserver", "--secret-stdin", "--parent-pipe",
                "0", "--register", f"127.0.0.1:{port}", "--host", "127.0.0.1",
                "--port", "0", "--no-discovery", "--cpus", "1",
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env=node_env(),
            )  # fmt: skip
            node[:] = [proc]
            assert proc.stdin is not None
            proc.stdin.write(SECRET + b"\n")
            try:
                ended.append(await asyncio.wait_for(proc.wait(), 20))
            except TimeoutError:
                ended.append(None)
                proc.kill()
                await proc.wait()
        server.close()

    run(scenario(), timeout=80)
    assert ended == [0, 0, 0]


@pytest.mark.slow
def test_node_with_another_secret_is_refused_and_exits(
    allow_error_logs: list[object],
) -> None:
    found: list[RegisteredNode] = []

    async def scenario() -> bytes:
        registrar = Registrar(SECRET, found.append, host="127.0.0.1")
        port = await registrar.start()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "nodeserver", "--secret-stdin",
                "--register", f"127.0.0.1:{port}", "--host", "127.0.0.1",
                "--port", "0", "--no-discovery",
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, env=node_env(),
            )  # fmt: skip
            _, err = await asyncio.wait_for(
                proc.communicate(b"some other secret\n"), 30
            )
            return err
        finally:
            registrar.close()

    err = run(scenario(), timeout=40)
    assert b"rejected this node's registration" in err
    assert not found


def test_a_registered_node_keeps_registering_quietly_through_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`keep_registered` with no session from its client: the client goes away,
    comes back with another secret (rejected), then with the right one, on the same
    port; the node says once that it lost it and once that it is registered again,
    each attempt between only at debug level, and the new listener gets the node."""
    found: list[RegisteredNode] = []
    caplog.set_level(logging.DEBUG, logger="nodeserver.register")

    def records(text: str, level: int) -> int:
        return sum(
            text in r.getMessage() and r.levelno == level for r in caplog.records
        )

    async def until(check: Callable[[], bool]) -> None:
        while not check():
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        first = Registrar(SECRET, found.append, host="127.0.0.1")
        port = await first.start()
        address = f"127.0.0.1:{port}"
        boot = new_boot_id()
        ip = await register(
            address, secret=SECRET, name="n1", port=9300, cpus=1, boot=boot
        )
        keep = asyncio.create_task(
            keep_registered(
                address, secret=SECRET, name="n1", port=9300, cpus=1, boot=boot,
                first_ip=ip, live_session=lambda ips, within: False, interval=0.05,
            )
        )  # fmt: skip
        try:
            # No session from it: registered again and again, at debug level.
            await until(lambda: records("registered again", logging.DEBUG) >= 2)
            assert len(found) == 1
            first.close()
            await until(lambda: records("failed", logging.DEBUG) >= 3)
            wrong = Registrar(b"not it", found.append, host="127.0.0.1", port=port)
            await wrong.start()
            await until(lambda: records("rejected", logging.DEBUG) >= 3)
            wrong.close()
            again = Registrar(SECRET, found.append, host="127.0.0.1", port=port)
            await again.start()
            try:
                await until(lambda: len(found) == 2)
                await until(lambda: records("registered again", logging.INFO) == 1)
            finally:
                again.close()
        finally:
            keep.cancel()
        assert found[1].port == 9300 and found[1].boot == boot
        assert records("lost the client at", logging.WARNING) == 1
        assert records("registered again", logging.INFO) == 1
        assert records("lost", logging.WARNING) == 1  # not once per attempt

    run(scenario(), timeout=20)


def test_a_client_not_listening_is_said_once_in_words(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``--register`` to a port where nothing listens: each retry was logged at
    info level (a dozen lines in 30 s) in asyncio's words, "[Errno 111] Connect
    call failed ('127.0.0.1', 9714)"; now one line, then the error, in words."""
    from tests.ports import held_ports

    caplog.set_level(logging.INFO, logger="nodeserver.register")
    with held_ports() as ports:
        port = ports()  # bound, not listening: refused
        with pytest.raises(DispynbError) as failed:
            run(
                register(
                    f"127.0.0.1:{port}",
                    secret=SECRET,
                    name="n1",
                    port=9300,
                    cpus=1,
                    patience=1.0,
                ),
                timeout=30,
            )
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        f"cannot register with the client at 127.0.0.1:{port} yet (connection "
        f"refused: nothing listens on port {port} there): retrying for 1 s"
    ], said
    assert str(failed.value) == (
        f"cannot register with the client at 127.0.0.1:{port}: connection refused: "
        f"nothing listens on port {port} there"
    )
