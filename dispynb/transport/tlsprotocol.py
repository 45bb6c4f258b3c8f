"""asyncio's TLS protocol, made to deliver what a peer said before it reset the
connection, and `start_tls`, which runs either side's handshake with it.

A peer that refuses a session says why and closes; if what we sent meanwhile is
unread, its kernel resets the connection. When our next write meets that reset,
asyncio's socket transport ends at once: the peer's last records, still in the
kernel's receive queue, were never read nor decrypted, and a scheduler's refusal
('over your --max_sessions') came out as 'Connection reset by peer'. `TlsProtocol`
first reads and decrypts them, bounded and without waiting (Linux keeps received
bytes after a reset), as `dispynb.transport.links.SocketLink` does over plain TCP.

This relies on asyncio's private ``SSLProtocol`` (3.11 to 3.13 alike): on a Python
whose protocol does not fit (another constructor, no ``_app_transport``), the
handshake runs through asyncio's public API, and the reason is lost as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from asyncio import sslproto
from collections.abc import Callable

__all__ = ["TlsProtocol", "start_tls"]

#: Most bytes read from the kernel once a connection failed: more than a socket's
#: receive buffer holds, so a bound against the unexpected only.
_REST = 64 << 20

logger = logging.getLogger(__name__)


class TlsProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol, delivering what the peer sent before a reset."""

    # asyncio's private state used here (typeshed does not declare it).
    _state: sslproto.SSLProtocolState
    _incoming: ssl.MemoryBIO  # ciphertext received, not decrypted yet
    _sslobj: ssl.SSLObject
    _do_read: Callable[[], None]  # decrypts, hands the app one buffer's worth

    def connection_lost(self, exc: BaseException | None) -> None:
        """asyncio callback: before the link ends on a failure (a write that met
        the peer's reset), decrypt and deliver what the kernel still holds."""
        if exc is not None:
            try:
                self._deliver_rest()
            except Exception:  # private state of another Python: lost, then
                logger.debug("what the TLS peer sent last not read", exc_info=True)
        super().connection_lost(exc)

    def _deliver_rest(self) -> None:
        # Called before asyncio's transport closes the socket; its reader is gone.
        transport = self._transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or not self._wrapped():
            return
        fd = sock.fileno()
        left = _REST
        while left > 0 and self._wrapped():
            try:
                count = os.readv(fd, [self.get_buffer(-1)])
            except OSError:  # nothing more (BlockingIOError), or the reset itself
                break
            if not count:
                break
            left -= count
            self.buffer_updated(count)  # decrypts, hands the app one buffer's worth
            self._decrypt_rest()

    def _decrypt_rest(self) -> None:
        """Hand the app the rest of what was decrypted: asyncio would in the next
        turns of the loop, after the link has ended."""
        while self._wrapped():
            held = (self._incoming.pending, self._sslobj.pending())
            if held == (0, 0):
                return
            self._do_read()
            if (self._incoming.pending, self._sslobj.pending()) == held:
                return  # a record not complete, or the app paused reading

    def _wrapped(self) -> bool:
        """Whether application data flows (the handshake done, no shutdown yet)."""
        return self._state is sslproto.SSLProtocolState.WRAPPED


async def start_tls(
    sock: socket.socket,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
    kind: type[TlsProtocol] | None = None,
) -> asyncio.Transport:
    """Run the TLS handshake on connected ``sock`` with a `TlsProtocol` (``kind``);
    the transport to ``protocol``. Raises the handshake's `ssl.SSLError` (or
    OSError)."""
    loop = asyncio.get_running_loop()
    handshake: asyncio.Future[None] = loop.create_future()
    try:
        tls = (kind or TlsProtocol)(
            loop,
            protocol,
            context,
            handshake,
            server_side=server_side,
            server_hostname=server_hostname,
        )
    except TypeError:  # another Python's private constructor
        tls = None
    # Made for `protocol` with the TLS protocol, as asyncio's own path returns it.
    app = getattr(tls, "_app_transport", None)
    if tls is None or not isinstance(app, asyncio.Transport):
        return await _public_start_tls(
            sock, protocol, context, server_side, server_hostname
        )
    ours = tls
    # No TLS at asyncio's level: ``ours`` runs it over the plain transport.
    raw, _ = await loop.create_connection(lambda: ours, sock=sock)
    try:
        await handshake
    except BaseException:
        raw.abort()
        raise
    return app


async def _public_start_tls(
    sock: socket.socket,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    server_side: bool,
    server_hostname: str | None,
) -> asyncio.Transport:
    """`start_tls` through asyncio's public API (its own TLS protocol)."""
    loop = asyncio.get_running_loop()
    if server_side:
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, sock, ssl=context
        )
    else:
        transport, _ = await loop.create_connection(
            lambda: protocol,
            sock=sock,
            ssl=context,
            server_hostname=server_hostname or "",
        )
    assert isinstance(transport, asyncio.Transport)
    return transport
