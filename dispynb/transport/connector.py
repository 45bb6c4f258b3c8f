"""`connect`: open an authenticated connection to a node server."""

from __future__ import annotations

import asyncio
import socket
import ssl

from dispynb.defaults import CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT
from dispynb.errors import (
    AuthenticationError,
    ConnectionClosedError,
    ConnectTimeoutError,
    ProtocolError,
    TransportError,
)
from dispynb.protocol.messages import Welcome
from dispynb.transport.addressing import format_address
from dispynb.transport.connection import Connection
from dispynb.transport.handshake import client_handshake


async def connect(
    host: str,
    port: int,
    *,
    secret: bytes | None,
    max_message_size: int,
    ssl_context: ssl.SSLContext | None = None,
    name: str = "",
    timeout: float = CONNECT_TIMEOUT,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> tuple[Connection, Welcome]:
    """Connect and authenticate to the node at ``host:port``.

    Raises
    ------
    ConnectTimeoutError
        The TCP connect or the handshake took too long.
    ConnectionClosedError
        Nothing accepts connections there, or it hung up.
    AuthenticationError
        The node does not share our secret.
    ProtocolError
        The peer is not a dispynb node, or runs another protocol version.
    """
    peer = format_address(host, port)
    try:
        async with asyncio.timeout(timeout):
            sock = await open_socket(host, port)
            if ssl_context is None:
                conn = Connection.over_socket(sock, peer)
            else:
                conn = await Connection.over_tls(
                    sock, peer, ssl_context, server_side=False, server_hostname=host
                )
    except TimeoutError:
        raise ConnectTimeoutError(
            f"connecting to {peer} timed out after {timeout} s"
        ) from None
    except TransportError as exc:
        if isinstance(exc, ConnectionClosedError):
            raise ConnectionClosedError(
                f"cannot connect to {peer}: {exc}; is dispynb-node running there?"
            ) from exc
        # A failed TLS handshake is a TLS failure, not "nothing there".
        raise TransportError(
            f"{exc}; does the node use TLS, with a certificate that this client "
            "trusts (cafile)?"
        ) from exc
    except OSError as exc:
        raise ConnectionClosedError(
            f"cannot connect to {peer}: {exc}; is dispynb-node running there?"
        ) from exc
    try:
        async with asyncio.timeout(handshake_timeout):
            welcome = await client_handshake(conn, secret, max_message_size, name)
    except TimeoutError:
        conn.abort()
        raise ConnectTimeoutError(
            f"{peer} did not complete the dispynb handshake in {handshake_timeout} s; "
            "is it a dispynb node (with TLS if the node uses TLS)?"
        ) from None
    except (ProtocolError, AuthenticationError) as exc:
        conn.abort()
        raise type(exc)(f"{peer}: {exc}") from exc
    except BaseException:
        conn.abort()
        raise
    return conn, welcome


async def open_socket(host: str, port: int) -> socket.socket:
    """A TCP socket connected to ``host:port``, trying each address it resolves to.

    Raises the first address's OSError when none accepts.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    errors: list[OSError] = []
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise errors[0] if errors else OSError(f"{host!r} resolves to no address")
