"""A real TLS node (``python -m nodeserver --certfile ... --cafile ...``) refusing
clients, seen from raw sockets: what a client that is not dispynb gets to read.

asyncio closed a failed TLS handshake without the alert OpenSSL had written, so a
client refused for its certificate read only the end of the connection; and a
client without TLS read nothing it could understand.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from tests.jobs import WAIT, wait_until
from tests.nodeproc import CliNode, running_node
from tests.transport.certs import make_cert

pytestmark = pytest.mark.slow


def _mutual_tls_node(tmp_path: Path) -> tuple[str, str, str]:
    """Certificates: the node's, the CA it trusts for clients, another one."""
    node, node_key = make_cert(tmp_path, "node")
    trusted, _ = make_cert(tmp_path, "client")
    return node, node_key, trusted


def _first_read(node: CliNode, context: ssl.SSLContext) -> str:
    """Connect with ``context``, finish the TLS handshake, send a little, and say
    what the first read brings: the alert's reason, or how the connection ended."""
    with (
        socket.create_connection(("127.0.0.1", node.port), timeout=WAIT) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        try:
            tls.sendall(b"\0" * 8)
            data = tls.recv(1024)
        except ssl.SSLError as exc:
            return f"alert: {exc.reason}"
        except OSError as exc:
            return f"error: {exc!r}"
        return f"read {data!r}"


@pytest.mark.parametrize("client_cert", ["none", "from another CA"])
def test_a_tls_node_refusing_a_client_certificate_sends_the_alert(
    tmp_path: Path, client_cert: str
) -> None:
    node_cert, node_key, trusted = _mutual_tls_node(tmp_path)
    context = ssl.create_default_context(cafile=node_cert)
    context.minimum_version = ssl.TLSVersion.TLSv1_3  # the client's side ends first
    if client_cert != "none":
        other, other_key = make_cert(tmp_path, "other")
        context.load_cert_chain(other, other_key)
    args = ("--certfile", node_cert, "--keyfile", node_key, "--cafile", trusted)
    with running_node(tmp_path / "node", *args) as node:
        seen = _first_read(node, context)
    if client_cert == "none":
        assert seen == "alert: TLSV13_ALERT_CERTIFICATE_REQUIRED"
    else:
        assert seen == "alert: TLSV1_ALERT_UNKNOWN_CA"


def test_a_tls_node_tells_a_client_without_tls_in_plain_text(tmp_path: Path) -> None:
    node_cert, node_key, trusted = _mutual_tls_node(tmp_path)
    args = ("--certfile", node_cert, "--keyfile", node_key, "--cafile", trusted)
    with running_node(tmp_path / "node", *args) as node:
        with socket.create_connection(("127.0.0.1", node.port), timeout=WAIT) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := raw.recv(4096):
                answer += chunk
        # Logged once the refusal is out.
        wait_until(lambda: "a client without TLS" in node.log_text())
        assert "a client without TLS (this node uses TLS)" in node.log_text()
    assert b"give the client cafile= (the CA that signed the node's certificate)" in (
        answer
    )


def test_a_node_without_tls_answers_a_tls_client_in_plain_text(tmp_path: Path) -> None:
    """A TLS client's ClientHello was read as a frame of 369 MB: the node closed,
    and the client read the end of its TLS handshake ('is dispynb-node running
    there?'). It is answered in plain text now, which TLS names as such."""
    node_cert, _key, _trusted = _mutual_tls_node(tmp_path)
    context = ssl.create_default_context(cafile=node_cert)
    with running_node(tmp_path / "node") as node:
        with (
            socket.create_connection(("127.0.0.1", node.port), timeout=WAIT) as raw,
            pytest.raises(ssl.SSLError) as raised,
        ):
            context.wrap_socket(raw, server_hostname="127.0.0.1")
        with socket.create_connection(("127.0.0.1", node.port), timeout=WAIT) as raw:
            raw.sendall(b"\x16\x03\x01\x00\x05hello")  # a TLS record's head
            answer = b""
            while chunk := raw.recv(4096):
                answer += chunk
        wait_until(lambda: "a TLS client" in node.log_text())
        assert "a TLS client (this node does not use TLS)" in node.log_text()
    assert raised.value.reason == "WRONG_VERSION_NUMBER"
    assert b"this node does not use TLS: connect without cafile=" in answer
