"""Tests of TLS contexts and of dispynb connections over TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
import struct
import threading
from asyncio import sslproto
from pathlib import Path

import pytest

from dispynb._loop import LoopRunner
from dispynb.errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectionClosedError,
    TransportError,
)
from dispynb.protocol.messages import JobCancel
from dispynb.transport import tlsaccept, tlsprotocol
from dispynb.transport.admission import Admission
from dispynb.transport.connection import Connection
from dispynb.transport.connector import open_socket
from dispynb.transport.tls import client_context, server_context
from tests.asyncutil import run
from tests.transport.certs import make_cert
from tests.transport.util import (
    WAIT,
    client,
    echo_round_trip,
    serving,
    wait_until,
    warnings_from,
)


def test_tls_verified_client_round_trips(cert):
    certfile, keyfile = cert

    async def main():
        async with serving(ssl_context=server_context(certfile, keyfile)) as (
            listener,
            echo,
        ):
            await echo_round_trip(
                listener.port, ssl_context=client_context(cafile=certfile)
            )
            async with client(
                listener.port, ssl_context=client_context(cafile=certfile)
            ) as (conn, _):
                await wait_until(lambda: len(echo.connections) == 2)
                assert conn.tls_version in ("TLSv1.2", "TLSv1.3")

    run(main())


def test_tls_unverified_client_still_encrypts_and_authenticates(cert):
    certfile, keyfile = cert

    async def main():
        async with serving(ssl_context=server_context(certfile, keyfile)) as (
            listener,
            _,
        ):
            await echo_round_trip(listener.port, ssl_context=client_context())
            with pytest.raises(AuthenticationError):
                async with client(
                    listener.port, secret=b"wrong", ssl_context=client_context()
                ):
                    pass

    run(main())


def test_tls_client_trusting_other_cert_raises_transport_error(cert, other_cert):
    certfile, keyfile = cert

    async def main():
        async with serving(ssl_context=server_context(certfile, keyfile)) as (
            listener,
            echo,
        ):
            with pytest.raises(TransportError) as info:
                async with client(
                    listener.port,
                    ssl_context=client_context(cafile=other_cert[0]),
                    handshake_timeout=5,
                ):
                    pass
            assert "TLS failure" in str(info.value)
            assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
            assert not isinstance(info.value, ConnectionClosedError)
            assert echo.names == []
            await echo_round_trip(
                listener.port, ssl_context=client_context(cafile=certfile)
            )

    run(main())


def test_a_client_not_trusting_the_nodes_certificate_is_logged_with_the_fix(
    cert, other_cert, caplog
):
    """The client hangs up in the handshake without an alert: the node's log says
    what that likely means (before: "connection to HOST:PORT failed: ", nothing)."""
    certfile, keyfile = cert

    async def main():
        async with serving(ssl_context=server_context(certfile, keyfile)) as (
            listener,
            _,
        ):
            with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
                async with client(
                    listener.port,
                    ssl_context=client_context(cafile=other_cert[0]),
                    handshake_timeout=5,
                ):
                    pass
            await wait_until(lambda: warnings_from(caplog, "TLS handshake"))

    run(main())
    [line] = warnings_from(caplog, "rejected")
    assert re.match(
        r"rejected connections from 127\.0\.0\.1:\d+: the client hung up", line
    )
    assert line.endswith(
        ": it may not trust this node's certificate (its cafile= must hold the CA "
        "that signed the node's --certfile, and the certificate name the address "
        "it connects to)"
    )


def test_tls_plain_client_to_tls_node_fails_cleanly(cert):
    certfile, keyfile = cert

    async def main():
        async with serving(ssl_context=server_context(certfile, keyfile)) as (
            listener,
            echo,
        ):
            with pytest.raises(TransportError) as info:
                async with client(listener.port, handshake_timeout=2):
                    pass
            assert "the node uses TLS, this client does not: give the client " in (
                str(info.value)
            )
            assert echo.names == []
            await echo_round_trip(
                listener.port, ssl_context=client_context(cafile=certfile)
            )

    run(main())


def test_tls_client_to_plain_node_fails_cleanly(cert, caplog):
    certfile, _ = cert

    async def main():
        async with serving() as (listener, echo):
            with pytest.raises(TransportError) as info:
                async with client(
                    listener.port,
                    ssl_context=client_context(cafile=certfile),
                    timeout=2,
                    handshake_timeout=2,
                ):
                    pass
            assert str(info.value).startswith(
                f"node 127.0.0.1:{listener.port} answered without TLS: it does not "
                "use TLS; connect without cafile=, certfile= and keyfile=, or start "
                "the node with --certfile and --keyfile"
            )
            assert echo.names == []
            await echo_round_trip(listener.port)

    run(main())


def test_tls_node_requiring_client_cert_rejects_client_without_one(cert, other_cert):
    certfile, keyfile = cert
    ca, client_key = other_cert

    async def main():
        context = server_context(certfile, keyfile, cafile=ca)
        async with serving(ssl_context=context) as (listener, echo):
            with pytest.raises(TransportError):
                async with client(
                    listener.port,
                    ssl_context=client_context(cafile=certfile),
                    handshake_timeout=2,
                ):
                    pass
            assert echo.names == []
            await echo_round_trip(
                listener.port,
                ssl_context=client_context(ca, client_key, cafile=certfile),
            )

    run(main())


def test_server_context_missing_certfile_raises(tmp_path):
    with pytest.raises(ConfigurationError, match="certfile"):
        server_context(str(tmp_path / "missing.pem"))


def test_server_context_missing_keyfile_raises(cert, tmp_path):
    with pytest.raises(ConfigurationError, match="keyfile"):
        server_context(cert[0], str(tmp_path / "missing.key"))


def test_server_context_missing_cafile_raises(cert, tmp_path):
    with pytest.raises(ConfigurationError, match="cafile"):
        server_context(*cert, cafile=str(tmp_path / "missing.pem"))


def test_server_context_mismatched_key_raises(cert, other_cert):
    # OpenSSL's "[X509: KEY_VALUES_MISMATCH] key values mismatch", in words
    with pytest.raises(ConfigurationError, match="is not the key of the certificate"):
        server_context(cert[0], other_cert[1], keyfile_option="--cluster_keyfile")


def test_a_certfile_without_its_key_names_the_option_that_gives_it(cert):
    """A certificate alone, no keyfile: the node said 'cannot load certificate
    'node.pem' / key None: [SSL] PEM lib (_ssl.c:3926)'."""
    with pytest.raises(ConfigurationError) as refused:
        server_context(cert[0])
    assert str(refused.value) == (
        f"certfile {cert[0]!r} holds no private key: give the file of its key with "
        "--keyfile"
    )
    with pytest.raises(ConfigurationError, match=r"its key with keyfile=$"):
        client_context(cert[0])


def test_server_context_garbage_cert_raises(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigurationError, match="cannot load"):
        server_context(str(bad))


def test_server_context_directory_as_certfile_raises(tmp_path):
    with pytest.raises(ConfigurationError, match="not a file"):
        server_context(str(tmp_path))


def test_client_context_missing_cafile_raises(tmp_path):
    with pytest.raises(ConfigurationError, match="cafile"):
        client_context(cafile=str(tmp_path / "missing.pem"))


def test_client_context_missing_certfile_raises(tmp_path):
    with pytest.raises(ConfigurationError, match="certfile"):
        client_context(certfile=str(tmp_path / "missing.pem"))


def test_contexts_require_tls_1_2_or_newer(cert):
    for context in (
        server_context(*cert),
        client_context(),
        client_context(cafile=cert[0]),
    ):
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_client_context_with_cafile_verifies_hostname(cert):
    context = client_context(cafile=cert[0])
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_server_context_with_cafile_requires_client_cert(cert):
    context = server_context(*cert, cafile=cert[0])
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_tls_large_message_round_trips_intact(cert):
    certfile, keyfile = cert
    big = os.urandom(5 * 1024 * 1024)

    async def main():
        async with (
            serving(ssl_context=server_context(certfile, keyfile)) as (
                listener,
                _,
            ),
            client(listener.port, ssl_context=client_context(cafile=certfile)) as (
                conn,
                _,
            ),
        ):
            sent = JobCancel(comp_id=1, key=7, attempt=0)
            await conn.send(sent, [big, b"tail"])
            message, buffers = await conn.recv()
            assert message == sent
            assert [bytes(b) for b in buffers] == [big, b"tail"]

    run(main())


def test_a_closed_tls_link_ends_even_if_the_peer_closed_while_reading_was_paused(
    cert, monkeypatch
):
    """asyncio's SSL transport stops reading and arms no shutdown timer when the
    peer's EOF arrives while reading is paused; closing it then never ends, and the
    socket is garbage-collected open. The link cuts it after `TLS_CLOSE_GRACE`."""
    from dispynb.transport import tlslink

    monkeypatch.setattr(tlslink, "TLS_CLOSE_GRACE", 0.2)
    certfile, keyfile = cert

    async def main():
        async with (
            serving(ssl_context=server_context(certfile, keyfile)) as (
                listener,
                echo,
            ),
            client(listener.port, ssl_context=client_context(cafile=certfile)) as (
                conn,
                _,
            ),
        ):
            await wait_until(lambda: len(echo.connections) == 1)
            conn.hold_reading(True)
            raw = conn._link._transport.get_extra_info("socket")
            peek = socket.socket(fileno=os.dup(raw.fileno()))
            try:
                echo.connections[0].close()

                def at_eof() -> bool:
                    # The peer's close_notify was read and only its EOF is left.
                    try:
                        return (
                            peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                        )
                    except BlockingIOError:
                        return False

                await wait_until(at_eof)
                for _ in range(3):  # the EOF's own read callback
                    await asyncio.sleep(0)
                conn.close()
                await wait_until(lambda: conn._link._protocol.lost)
            finally:
                peek.close()

    run(main())


def test_a_tls_link_closing_as_its_loop_stops_leaves_no_socket_open(cert):
    """A client closing its last cluster stops its I/O loop while the TLS shutdown
    waits for the node's close_notify (a busy node): the link's cut timer never
    runs, so the loop's shutdown cuts the socket, not the garbage collector."""
    certfile, keyfile = cert
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = threading.Event()
    done = threading.Event()

    def silent_node() -> None:
        # Completes the TLS handshake, then never reads: no close_notify answer.
        raw, _ = listener.accept()
        with server_context(certfile, keyfile).wrap_socket(raw, server_side=True):
            accepted.set()
            done.wait(WAIT)

    thread = threading.Thread(target=silent_node)
    thread.start()
    port = listener.getsockname()[1]

    async def connect_and_close() -> str:
        sock = await open_socket("127.0.0.1", port)
        conn = await Connection.over_tls(
            sock,
            f"127.0.0.1:{port}",
            client_context(cafile=certfile),
            server_side=False,
            server_hostname="127.0.0.1",
        )
        fd = conn._link.extra("socket").fileno()
        conn.close()
        return f"/proc/self/fd/{fd}:{os.readlink(f'/proc/self/fd/{fd}')}"

    def still_open(fd_and_target: str) -> bool:
        path, target = fd_and_target.split(":", 1)
        try:
            return os.readlink(path) == target
        except FileNotFoundError:
            return False

    assert LoopRunner._instance is None, "another test's I/O loop is still running"
    runner = LoopRunner.acquire()
    try:
        socket_fd = runner.run_sync(connect_and_close, timeout=WAIT)
        assert accepted.wait(WAIT)
        assert still_open(socket_fd)  # the TLS shutdown waits for the node
    finally:
        runner.release()  # the loop stops and closes
        done.set()
        thread.join(WAIT)
        listener.close()
    assert not still_open(socket_fd)


def _refusing_tls_server(context: ssl.SSLContext) -> tuple[int, threading.Thread]:
    """A plain OpenSSL server on 127.0.0.1 that accepts one connection and runs its
    TLS handshake: it sends the alert that says why it refuses a client's
    certificate (a dispynb node only closes). Returns its port and thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)

    def serve() -> None:
        with listener:
            sock, _ = listener.accept()
            sock.settimeout(WAIT)
            raw = sock.dup()
            try:
                with context.wrap_socket(sock, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass  # the refusal: the alert is sent
            # Read what the client sent until it hangs up: closing with unread data
            # would reset the connection, and the client might lose the alert.
            with raw, contextlib.suppress(OSError):
                while raw.recv(65536):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


@pytest.mark.parametrize("with_cert", [False, True])
def test_tls_alert_refusing_the_client_cert_is_named_with_the_fix(
    cert, other_cert, tmp_path, with_cert
):
    certfile, keyfile = cert
    ca, _ = make_cert(tmp_path, "ca")  # the node trusts only this CA
    port, thread = _refusing_tls_server(server_context(certfile, keyfile, cafile=ca))
    given = other_cert if with_cert else (None, None)

    async def main():
        with pytest.raises(TransportError) as info:
            async with client(
                port,
                ssl_context=client_context(*given, cafile=certfile),
                handshake_timeout=WAIT,
            ):
                pass
        return str(info.value)

    message = run(main())
    thread.join(WAIT)
    assert f"node 127.0.0.1:{port} closed the TLS connection" in message
    if with_cert:
        assert "it does not trust this client's certificate" in message
        assert (
            "--cafile must hold the CA that signed the client's certificate "
            f"{other_cert[0]!r}" in message
        )
    else:
        assert "it requires a client certificate: give the client certfile=" in message
    assert "may" not in message  # the alert said why: no guess


def test_tls_node_refusing_a_client_without_cert_says_it_requires_one(cert):
    """The node's listener sends the TLS alert of its failed handshake (asyncio
    dropped it, and the client could only say the node "may" require one)."""
    certfile, keyfile = cert

    async def main():
        context = server_context(certfile, keyfile, cafile=certfile)
        async with serving(ssl_context=context) as (listener, echo):
            with pytest.raises(TransportError) as info:
                async with client(
                    listener.port,
                    ssl_context=client_context(cafile=certfile),
                    handshake_timeout=WAIT,
                ):
                    pass
            assert echo.names == []
            return listener.port, str(info.value)

    port, message = run(main())
    assert message.startswith(
        f"node 127.0.0.1:{port} closed the TLS connection during the handshake: "
        "it requires a client certificate: give the client certfile= and keyfile="
    )
    assert "CERTIFICATE_REQUIRED" in message


class _NewConstructor(sslproto.SSLProtocol):
    """asyncio's TLS protocol as a later Python might make it: another signature."""

    def __init__(self, loop, app_protocol, sslcontext, waiter, *, server_side, mode):
        raise AssertionError("not called with these arguments")


class _RenamedState:
    """A TLS protocol that keeps its state under other names than 3.11-3.13's."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._app_transport_v2 = None


@pytest.mark.parametrize("protocol", [_NewConstructor, _RenamedState])
def test_a_tls_node_serves_when_asyncios_private_tls_protocol_differs(
    cert, monkeypatch, protocol
):
    """The listener's TLS alert relies on asyncio's private SSLProtocol: on a
    Python where it differs, the node serves TLS as asyncio does, without the
    alert (before: every TLS client failed, TypeError or AttributeError); and a
    client connects as asyncio does (its reading of a peer's last records before
    a reset relies on SSLProtocol too)."""
    certfile, keyfile = cert
    monkeypatch.setattr(tlsaccept, "_AlertingProtocol", protocol)
    monkeypatch.setattr(tlsprotocol, "TlsProtocol", protocol)

    async def main():
        async with serving(ssl_context=server_context(certfile, keyfile)) as (
            listener,
            echo,
        ):
            await echo_round_trip(
                listener.port, ssl_context=client_context(cafile=certfile)
            )
            assert len(echo.names) == 1
        context = server_context(certfile, keyfile, cafile=certfile)
        async with serving(ssl_context=context) as (listener, echo):
            with pytest.raises(TransportError, match="client certificate"):
                async with client(
                    listener.port,
                    ssl_context=client_context(cafile=certfile),
                    handshake_timeout=WAIT,
                ):
                    pass
            assert echo.names == []

    run(main())


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_client_resetting_before_its_first_byte_is_no_failure_of_the_node(
    cert, caplog, tls
):
    """A peer that connects and resets without a byte (a port scanner, a client
    killed as it connects) is logged as a peer that closed; before, the node's
    wait for its first byte (plain or TLS) said "the node could not answer"."""
    certfile, keyfile = cert
    context = server_context(certfile, keyfile) if tls else None

    async def main():
        async with serving(ssl_context=context) as (listener, echo):
            sock = socket.create_connection(("127.0.0.1", listener.port))
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            sock.close()  # a reset, nothing sent
            await wait_until(lambda: warnings_from(caplog, "rejected connections"))
            kw = {"ssl_context": client_context(cafile=certfile)} if tls else {}
            await echo_round_trip(listener.port, **kw)
            assert len(echo.names) == 1

    run(main())
    [warning] = warnings_from(caplog, "rejected connections")
    assert "could not answer" not in warning
    assert "closed" in warning or "reset" in warning


def test_a_tls_client_refused_at_accept_by_a_busy_tls_node_retries(cert, caplog):
    """A TLS node refusing a connection at accept (too many handshakes pending, or
    failed, from its address) tells a TLS client in TLS (an alert), which it reads
    as 'busy' and retries; before, the refusal was a dispynb frame, which the
    client's TLS library read as no TLS: 'it does not use TLS; connect without
    cafile=', and it gave up."""
    certfile, keyfile = cert

    async def main():
        context = server_context(certfile, keyfile)
        async with serving(
            ssl_context=context,
            admission=Admission(max_pending=1, max_pending_per_source=1),
        ) as (
            listener,
            echo,
        ):
            with socket.create_connection(("127.0.0.1", listener.port)) as hog:
                await wait_until(lambda: listener.admission.pending == 1)
                connecting = asyncio.ensure_future(
                    echo_round_trip(
                        listener.port,
                        ssl_context=client_context(cafile=certfile),
                        retry_for=WAIT,
                    )
                )
                await wait_until(lambda: warnings_from(caplog, "refused connections"))
                assert not connecting.done(), connecting.exception()
                hog.close()  # its handshake fails: room for the client's retry
            await asyncio.wait_for(connecting, WAIT)
            assert len(echo.names) == 1

    run(main())


def test_a_cafile_others_may_write_is_refused(cert, other_cert):
    """A node's --cafile says whose client certificates it trusts (with no secret,
    they are the whole authentication): another user able to write it added their
    own CA and ran jobs on the node. So for a client's cafile (a node's identity)."""
    certfile, keyfile = cert
    os.chmod(other_cert[0], 0o666)
    with pytest.raises(ConfigurationError, match="chmod go-w"):
        server_context(certfile, keyfile, cafile=other_cert[0])
    with pytest.raises(ConfigurationError, match="chmod go-w"):
        client_context(cafile=other_cert[0])
    os.chmod(other_cert[0], 0o644)  # readable by all: a certificate is public
    server_context(certfile, keyfile, cafile=other_cert[0])


def test_a_private_key_others_may_read_is_refused(cert, tmp_path):
    """Whoever reads a node's key can pass for the node (or a client's, for the
    client); in the certfile when no keyfile is given, the certfile is checked."""
    certfile, keyfile = cert
    os.chmod(keyfile, 0o644)
    with pytest.raises(ConfigurationError, match="chmod o-rwx"):
        server_context(certfile, keyfile)
    with pytest.raises(ConfigurationError, match="chmod o-rwx"):
        client_context(certfile, keyfile)
    both = tmp_path / "both.pem"
    both.write_bytes(Path(certfile).read_bytes() + Path(keyfile).read_bytes())
    os.chmod(both, 0o644)
    with pytest.raises(ConfigurationError, match="chmod o-rwx"):
        server_context(str(both))
    os.chmod(keyfile, 0o640)  # a group's (ssl-cert) may read it
    server_context(certfile, keyfile)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_tls_files_of_another_user_are_refused(cert, other_cert):
    certfile, keyfile = cert
    os.chown(other_cert[0], 65534, -1)
    with pytest.raises(ConfigurationError, match="belongs to"):
        server_context(certfile, keyfile, cafile=other_cert[0])
    os.chown(keyfile, 65534, -1)
    with pytest.raises(ConfigurationError, match="belongs to"):
        server_context(certfile, keyfile)
