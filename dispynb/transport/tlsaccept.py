"""A node's side of the TLS handshake, with the alert that says why it failed.

asyncio's TLS protocol (`asyncio.sslproto.SSLProtocol`) closes the socket at once
when the server's handshake fails, dropping the alert OpenSSL wrote for the peer
(``certificate required``, ``unknown CA``...): a client refused for its certificate
saw only a closed connection, and could only guess that its certificate "may" be
the reason. `accept_tls` runs the same protocol but sends that alert, then the end
of the stream, before the close; the client names the reason and the fix
(`dispynb.transport.tls.handshake_refusal`).

A client that speaks no TLS at all to a TLS node is told so in its own protocol
(`starts_tls`, then the listener's refusal), not with a TLS alert it cannot read.

The alert relies on asyncio's private ``SSLProtocol``, as `TlsProtocol` does: on a
Python whose protocol does not fit, the handshake runs through asyncio's public
API, without the alert (`dispynb.transport.tlsprotocol.start_tls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from asyncio import sslproto

from dispynb.transport.tlsprotocol import TlsProtocol, start_tls

__all__ = [
    "BUSY_ALERT",
    "BUSY_ALERT_RECORD",
    "TLS_HANDSHAKE_RECORD",
    "accept_tls",
    "starts_tls",
]

#: The first byte of a TLS handshake record (a ClientHello). A dispynb frame starts
#: with its length, whose first byte is 0 for any frame a node accepts before
#: authentication.
TLS_HANDSHAKE_RECORD = 0x16

#: What a TLS node sends a TLS client it refuses at accept (too many handshakes
#: pending or failed, `dispynb.transport.admission`): a fatal ``user_canceled``
#: alert in a plaintext record, which no TLS library sends in a handshake of its
#: own; a dispynb client reads it as "busy" (`BUSY_ALERT`) and tries again later.
BUSY_ALERT_RECORD = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 90])

#: How OpenSSL names that alert, at the client.
BUSY_ALERT = "ALERT_USER_CANCELLED"

#: Bytes of the refused client's unread data read before the close: closing with
#: unread data sends a reset, which can overtake the alert.
_DRAIN = 64 * 1024

logger = logging.getLogger(__name__)


class _AlertingProtocol(TlsProtocol):
    """`TlsProtocol`, sending a failed handshake's alert before closing."""

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            try:
                _send_alert(self)
            except Exception:  # private state of another Python: no alert, then
                logger.debug("no TLS alert sent", exc_info=True)
        super()._on_handshake_complete(handshake_exc)


def _send_alert(protocol: sslproto.SSLProtocol) -> None:
    """Write what OpenSSL queued for the peer (the alert), end the stream, and read
    what the peer sent meanwhile; best effort, never blocking."""
    outgoing = getattr(protocol, "_outgoing", None)
    transport = getattr(protocol, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if not isinstance(outgoing, ssl.MemoryBIO) or sock is None:
        return
    alert = outgoing.read()
    with contextlib.suppress(OSError):
        fd = sock.fileno()
        if alert:
            os.write(fd, alert)
        sock.shutdown(socket.SHUT_WR)
        left = _DRAIN
        while left > 0:
            data = os.read(fd, min(left, 16384))
            if not data:
                break
            left -= len(data)


async def accept_tls(
    sock: socket.socket, protocol: asyncio.BaseProtocol, context: ssl.SSLContext
) -> asyncio.Transport:
    """Run the server side of the TLS handshake on accepted ``sock``; the transport
    to ``protocol``. Raises the handshake's `ssl.SSLError` (or OSError) once the
    peer has been sent the alert that says why."""
    return await start_tls(
        sock, protocol, context, server_side=True, kind=_AlertingProtocol
    )


async def starts_tls(sock: socket.socket) -> bool | None:
    """Whether the peer's first byte on ``sock`` opens a TLS handshake (None: it
    closed, or reset the connection, without sending anything). The byte is left
    to be read."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    sock.setblocking(False)
    fd = sock.fileno()
    while True:
        loop.add_reader(fd, ready)
        try:
            await readable
        finally:
            loop.remove_reader(fd)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            readable = loop.create_future()
            continue
        except ConnectionError:  # reset before a byte: closed, as far as we care
            return None
        if not first:
            return None
        return first[0] == TLS_HANDSHAKE_RECORD
