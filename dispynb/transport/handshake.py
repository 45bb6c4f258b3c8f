"""Runs the protocol handshake over a `Connection`, for either side."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from dispynb.errors import (
    AuthenticationError,
    DispynbError,
    MessageError,
    ProtocolVersionError,
)
from dispynb.protocol.handshake import (
    ClientHandshake,
    NodeHandshake,
    SecretSource,
    refusal,
)
from dispynb.protocol.messages import Welcome, WireMessage
from dispynb.transport.connection import Connection


async def _recv_wire(conn: Connection) -> WireMessage:
    message = await conn.recv_unsigned_single()
    if not isinstance(message, WireMessage):
        raise MessageError(f"unexpected {message.op!r} during handshake")
    return message


async def client_handshake(
    conn: Connection,
    secret: bytes | None,
    max_size: int,
    name: str = "",
    user: str = "",
) -> Welcome:
    """Authenticate to a node (as scheduler ``user`` if given); return its
    `Welcome`. The connection is then signed."""
    handshake = ClientHandshake(secret, name, user)
    conn.write(handshake.hello())
    conn.write(handshake.on_challenge(await _recv_wire(conn)))
    handshake.on_confirm(await _recv_wire(conn))
    send_key, receive_key = handshake.keys()
    conn.start_signing(send_key, receive_key, max_size)
    welcome, _ = await conn.recv()
    if not isinstance(welcome, Welcome):
        raise MessageError(f"expected 'welcome' from node, got {welcome.op!r}")
    return welcome


async def node_handshake(
    conn: Connection,
    secret: SecretSource,
    max_size: int,
    make_welcome: Callable[[], Welcome],
    handshake: NodeHandshake | None = None,
) -> str:
    """Authenticate a client; send our `Welcome`; return the client's name.

    On failure the client is told why (an unsigned error message) before the caller
    closes the connection. ``handshake``: the caller's (made with ``secret``), to
    learn the name a client gave that failed (`NodeHandshake.client_name`).
    """
    handshake = handshake or NodeHandshake(secret)
    try:
        hello = await _recv_wire(conn)
        conn.write(handshake.on_hello(hello))
        confirm = handshake.on_auth(await _recv_wire(conn))
    except (AuthenticationError, ProtocolVersionError, MessageError) as exc:
        with contextlib.suppress(DispynbError):
            await conn.send(refusal(exc))
        raise
    conn.write(confirm)
    send_key, receive_key = handshake.keys()
    conn.start_signing(send_key, receive_key, max_size)
    await conn.send(make_welcome())
    return handshake.client_name
