"""`connect`: open an authenticated connection to a node server."""

from __future__ import annotations

import asyncio
import ssl

from tornado.iostream import StreamClosedError
from tornado.tcpclient import TCPClient

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
from dispynb.transport.connection import Connection, stream_buffer_size
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
            stream = await TCPClient().connect(
                host,
                port,
                ssl_options=ssl_context,
                max_buffer_size=stream_buffer_size(max_message_size),
            )
    except TimeoutError:
        raise ConnectTimeoutError(
            f"connecting to {peer} timed out after {timeout} s"
        ) from None
    except (OSError, StreamClosedError) as exc:
        # --- fix: a failed TLS handshake is a TLS failure, not "nothing there" ---
        cause = exc.real_error if isinstance(exc, StreamClosedError) else exc
        if isinstance(cause, ssl.SSLError):
            raise TransportError(
                f"TLS failure with {peer}: {cause}; does the node use TLS, with a "
                "certificate that this client trusts (cafile)?"
            ) from exc
        # --- end of fix ---
        raise ConnectionClosedError(
            f"cannot connect to {peer}: {exc}; is dispynb-node running there?"
        ) from exc
    conn = Connection(stream, peer)
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
