"""`Connection`: whole dispynb messages over a socket link, signed after auth.

It writes: messages framed and signed, in one system call when the socket takes
them. What it receives (frames checked as they arrive, `recv`, `dispatch`) is
`dispynb.transport.inbox`'s, with `_link_error`, which turns socket and TLS errors
into dispynb errors: upper layers never see OSError or ssl.SSLError from a
connection.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import socket
import ssl
import sys
import termios
from collections.abc import Callable, Sequence
from typing import Any

from dispynb.defaults import PRE_AUTH_MAX_FRAME
from dispynb.errors import DispynbError
from dispynb.protocol.auth import MAC_SIZE, MessageSigner, MessageVerifier
from dispynb.protocol.framing import (
    HEADS,
    PREFIX,
    PREFIX_SIZE,
    Buffer,
    Frame,
    FrameDecoder,
    encode_frames,
)
from dispynb.protocol.messages import Message, WireMessage, pack_header
from dispynb.transport.inbox import (
    BadMessageError,
    EarlyHandler,
    Handler,
    _Inbox,
    _link_error,
    _Received,
)
from dispynb.transport.links import Link, SocketLink
from dispynb.transport.tlsaccept import accept_tls
from dispynb.transport.tlslink import FrameProtocol, TransportLink
from dispynb.transport.tlsprotocol import start_tls

logger = logging.getLogger(__name__)

#: Pieces of messages written and not taken by the kernel past which a peer is
#: said not to read (`Connection.unread`), whatever their bytes: about 10,000
#: small messages, some 10 MiB here.
QUEUED_HIGH = 32 * 1024

#: Signed messages from this size on are hashed as they are sent and received, so
#: the MAC overlaps the transfer instead of preceding (sender) or following (receiver)
#: it.
HASH_IN_FLIGHT = 256 * 1024

#: Payload buffers of a message that `Connection.write` frames inline (more: by
#: `encode_frames`).
_FEW = 4

#: Pieces smaller than this are joined before writing: fewer iovecs and MAC updates.
_COALESCE_LIMIT = 64 * 1024


class Connection(_Inbox):
    """One message connection; starts unsigned (handshake), then every message is MAC'd.

    Create it with `over_socket` (plain TCP, or a Unix socket between processes of a
    node) or `over_tls`.

    Parameters
    ----------
    peer:
        Printable peer address, for messages and logs.
    family:
        The message family decoded on this connection.
    trusted_max_size:
        For a channel between processes of one node (a Unix socket pair): no
        handshake, no MACs, headers decoded without pre-auth limits, this size cap.
    """

    def __init__(
        self,
        peer: str,
        family: type[Message] = WireMessage,
        trusted_max_size: int | None = None,
    ) -> None:
        self.peer = peer
        self.family = family
        self.decoder = FrameDecoder(trusted_max_size or PRE_AUTH_MAX_FRAME)
        self._trusted = trusted_max_size is not None
        self._signer: MessageSigner | None = None
        self._verifier: MessageVerifier | None = None
        self._link: Link | None = None
        self._inbox: collections.deque[_Received] = collections.deque()
        self._partial: list[Any] | None = None  # [body, seq, running mac, hashed]
        self._inbox_bytes = 0
        #: See `dispynb.transport.links.FrameSink.read_lowat` (0: off).
        self.read_lowat = 0
        self._paused = False
        self._held = False  # reading stopped by the owner (`hold_reading`)
        self._failure: DispynbError | None = None  # raised by recv once inbox is empty
        self._waiter: asyncio.Future[None] | None = None
        self._handler: Handler | None = None
        self._dispatched: asyncio.Future[None] | None = None
        self._on_bad: Callable[[BadMessageError], None] | None = None
        self._early: EarlyHandler | None = None
        self._delivering = False
        self.bytes_sent = 0
        self.bytes_received = 0
        #: The frame of the message `recv` or `dispatch` handed out last, as it came
        #: (``(prefix, count, body without its MAC)``), what `relay` passes on
        #: unchanged; None after a large or unsigned one (a large one's memory is not
        #: held past its turn).
        self.last_frame: Frame | None = None
        #: Bytes of that message as a peer's ``max_message_size`` counts them (its
        #: frame after the 8-byte prefix, MAC included): what a relay that joins
        #: messages adds up.
        self.last_size = 0
        #: The largest header (bytes) decoded from the authenticated peer (None: as
        #: large as its frames): a header's objects take up to 64 times its bytes
        #: in memory, and decoding it holds the loop, where its payload buffers
        #: cost neither. A larger one is a `BadMessageError`, not decoded.
        self.max_header: int | None = None
        #: Reads from the link so far, complete frames or not: a peer whose big
        #: message is still arriving on a slow link is alive (the pulse watchdog).
        self.reads = 0

    @classmethod
    def over_socket(
        cls,
        sock: socket.socket,
        peer: str,
        family: type[Message] = WireMessage,
        trusted_max_size: int | None = None,
    ) -> Connection:
        """A connection over a connected stream socket (owned from now on)."""
        conn = cls(peer, family, trusted_max_size)
        conn._link = SocketLink(sock, conn)
        return conn

    @classmethod
    async def over_tls(
        cls,
        sock: socket.socket,
        peer: str,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> Connection:
        """Run the TLS handshake on a connected socket; return the connection.

        Raises `TransportError` if the TLS handshake fails, `ConnectionClosedError`
        if the peer hangs up; the socket is closed then.
        """
        conn = cls(peer)
        protocol = FrameProtocol(conn)
        try:
            if server_side:
                transport = await accept_tls(sock, protocol, context)
            else:
                transport = await start_tls(
                    sock,
                    protocol,
                    context,
                    server_side=False,
                    server_hostname=server_hostname,
                )
        except (OSError, EOFError) as exc:
            sock.close()
            raise _link_error(peer, exc) from exc
        except BaseException:
            sock.close()
            raise
        conn._link = TransportLink(transport, protocol)
        return conn

    # -- state -------------------------------------------------------------------------

    @property
    def authenticated(self) -> bool:
        """True once messages are signed and checked."""
        return self._verifier is not None

    @property
    def closed(self) -> bool:
        """True once the connection is closed."""
        return self._link is None or self._link.closed

    def unread_bytes(self) -> int:
        """Bytes from the peer waiting in the kernel, not read yet (0: none, or
        unknown).

        The pulse watchdogs ask before they declare a peer dead: a check can run
        before the loop's reads of the same turn, after a long callback, and a
        paused reader reads nothing; bytes waiting there came from the peer all the
        same (a stopped peer sends none)."""
        return self._socket_count(termios.FIONREAD)

    def untaken_bytes(self) -> int:
        """Bytes the kernel took from us that the peer has not taken yet (0: none,
        or unknown): with `unsent`, what a slow reader has yet to take. The kernel
        takes more only once a third of its buffer (megabytes) is free: seconds
        apart for a slow reader, which meanwhile takes bytes all the same."""
        return self._socket_count(termios.TIOCOUTQ)

    def _socket_count(self, request: int) -> int:
        """The count the socket's ``ioctl`` ``request`` gives (0: unknown)."""
        sock = self._link.extra("socket") if self._link is not None else None
        if sock is None:
            return 0
        try:
            fd = sock.fileno()
            if fd < 0:
                return 0
            count = fcntl.ioctl(fd, request, b"\0\0\0\0")
        except (OSError, ValueError):
            return 0
        return int.from_bytes(count, sys.byteorder)

    @property
    def writes_directly(self) -> bool:
        """True if `write` is one ``sendmsg`` on an open plain socket with nothing
        queued before it: no callback of the loop is involved unless the socket is
        full or fails (then `unsent` or `closed` says so)."""
        link = self._link
        return type(link) is SocketLink and not link.closed and not link.unsent

    @property
    def max_size(self) -> int:
        """Largest message body accepted now."""
        return self.decoder.max_size

    @property
    def local_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of our end, for TCP connections."""
        return self._address("sockname")

    @property
    def peer_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the peer, for TCP connections."""
        return self._address("peername")

    @property
    def tls_version(self) -> str | None:
        """The TLS version in use ("TLSv1.3"...), or None without TLS."""
        ssl_object = self._link.extra("ssl_object") if self._link else None
        return ssl_object.version() if ssl_object is not None else None

    def _address(self, name: str) -> tuple[str, int] | None:
        value = self._link.extra(name) if self._link is not None else None
        if isinstance(value, tuple) and len(value) >= 2:
            return str(value[0]), int(value[1])
        return None

    def start_signing(self, send_key: bytes, receive_key: bytes, max_size: int) -> None:
        """Switch to signed messages (after the handshake) and raise the size cap."""
        self._signer = MessageSigner(send_key)
        self._verifier = MessageVerifier(receive_key)
        self.decoder.max_size = max_size
        self.decoder.mac_size = MAC_SIZE  # a large frame's lengths are checked early

    # -- sending -----------------------------------------------------------------------

    def write(
        self,
        message: Message,
        buffers: Sequence[Buffer] = (),
        fds: Sequence[int] = (),
    ) -> None:
        """Send ``message`` now, or queue what the socket cannot take (no waiting).

        ``fds`` (a Unix socket's only) travel with the message's first byte
        (SCM_RIGHTS); they must stay open until `flush` returns (the link takes its
        own reference only once that byte leaves). Raises `ConnectionClosedError` if
        the connection is already closed.
        """
        link = self._link
        if link is None or link.closed:
            raise self._ended()
        if fds and self._signer is not None:
            raise ValueError("file descriptors travel only on a node's own channels")
        header = pack_header(message.to_header())
        mac_size = MAC_SIZE if self._signer else 0
        if len(buffers) <= _FEW:
            # `encode_frames` inline for the usual message (a job, a result, a
            # control message: a header and a buffer or two)
            lengths = [len(header)]
            for buffer in buffers:
                lengths.append(memoryview(buffer).nbytes)
            count = len(lengths)
            body = 4 * count + sum(lengths)
            if PREFIX_SIZE + body < _COALESCE_LIMIT:
                data = b"".join(
                    [
                        HEADS[count].pack(body + mac_size, count, *lengths),
                        header,
                        *buffers,
                    ]
                )
                size = PREFIX_SIZE + body
                if self._signer is None:
                    link.write((data,), None, fds, size)
                else:
                    link.write(
                        (data, self._signer.sign_frame(b"", data)), size=size + MAC_SIZE
                    )
                self.bytes_sent += size + mac_size
                return
        head, parts = encode_frames([header, *buffers], mac_size)
        pieces: list[Buffer] = [head, *parts]
        size = PREFIX_SIZE + PREFIX.unpack_from(head)[0] - mac_size  # head and parts
        if size < _COALESCE_LIMIT:
            # The usual small message (a job, a result, a control message): every
            # piece is small, so it is joined whole, and hashed in one call.
            data = b"".join(pieces)
            if self._signer is None:
                link.write((data,), None, fds, size)
            else:
                link.write(
                    (data, self._signer.sign_frame(b"", data)), size=size + MAC_SIZE
                )
        elif self._signer is None:
            link.write(_coalesced(pieces), None, fds)
        elif size >= HASH_IN_FLIGHT:
            link.write(_coalesced(pieces), self._signer.start(size))
        else:  # what `MessageSigner.sign` does, with the size known already
            mac = self._signer.start(size)
            for piece in pieces:
                mac.update(piece)
            pieces.append(mac.digest())
            link.write(_coalesced(pieces))
        self.bytes_sent += size + mac_size

    def write_many(self, messages: Sequence[tuple[Message, Sequence[Buffer]]]) -> None:
        """`write` several messages, small ones leaving together in one system call
        (a node handing a worker a few short jobs at once: one wake-up, not one per
        job). Each message keeps its own frame and MAC; the order is kept."""
        link = self._link
        if link is None or link.closed:
            raise self._ended()
        joined: list[Buffer] = []
        signer = self._signer
        mac_size = MAC_SIZE if signer else 0
        for message, buffers in messages:
            header = pack_header(message.to_header())
            head, parts = encode_frames([header, *buffers], mac_size)
            size = PREFIX_SIZE + PREFIX.unpack_from(head)[0] - mac_size
            if size >= _COALESCE_LIMIT:
                if joined:
                    link.write(joined)
                    joined = []
                self.write(message, buffers)
                continue
            data = b"".join([head, *parts])
            joined.append(data)
            if signer is not None:
                joined.append(signer.sign_frame(b"", data))
            self.bytes_sent += size + mac_size
        if joined:
            link.write(joined)

    def relay(self, frame: Frame) -> None:
        """Send a message received on another signed connection (its `last_frame`)
        as it came, signed for this one: a relay passes a message on unchanged
        without encoding it again. Raises `ConnectionClosedError` as `write` does,
        ValueError on an unsigned connection (its frames carry no MAC)."""
        link = self._link
        if link is None or link.closed:
            raise self._ended()
        signer = self._signer
        if signer is None:
            raise ValueError("only a signed connection relays a signed frame")
        prefix, _count, signed = frame
        size = PREFIX_SIZE + len(signed) + MAC_SIZE
        link.write((prefix, signed, signer.sign_frame(prefix, signed)), size=size)
        self.bytes_sent += size

    async def send(self, message: Message, buffers: Sequence[Buffer] = ()) -> None:
        """Send ``message`` and wait until the socket has taken it (backpressure)."""
        self.write(message, buffers)
        await self.flush()

    async def flush(self) -> None:
        """Wait until everything written so far has gone to the socket.

        Raises `ConnectionClosedError` if the connection ended first.
        """
        link = self._link
        if link is not None:
            await link.drained()
        if link is None or link.closed:
            raise self._ended()

    @property
    def unsent(self) -> int:
        """Bytes written that the kernel has not taken yet (a slow or stuck reader)."""
        return self._link.unsent if self._link is not None else 0

    def unread(self, high: int) -> bool:
        """Whether what was written and not taken by the kernel is past ``high``
        bytes, or past `QUEUED_HIGH` pieces of messages: a peer that sends
        requests without reading their answers (each small, each taking many
        times its bytes here) is to be read no more until it has taken them."""
        link = self._link
        return link is not None and (link.unsent > high or link.queued > QUEUED_HIGH)

    @property
    def all_sent(self) -> bool:
        """Whether everything written went to the kernel, even if the connection has
        ended since (a peer that read it all and hung up); False when unknown."""
        return self._link is not None and self._link.all_sent

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent); bytes already sent are delivered."""
        if self._link is not None:
            self._link.close()

    def abort(self) -> None:
        """Close at once after an error (idempotent)."""
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Connection {self.peer} {state}>"


def _coalesced(pieces: list[Buffer]) -> list[Buffer]:
    """Join runs of small pieces (header, lengths, MAC): fewer iovecs."""
    if len(pieces) <= 2:
        return pieces
    out: list[Buffer] = []
    small: list[Buffer] = []
    for piece in pieces:
        if memoryview(piece).nbytes < _COALESCE_LIMIT:
            small.append(piece)
            continue
        if small:
            out.append(b"".join(small) if len(small) > 1 else small[0])
            small = []
        out.append(piece)
    if small:
        out.append(b"".join(small) if len(small) > 1 else small[0])
    return out


def describe_error(exc: BaseException) -> str:
    """One line for logs: dispynb errors as they are, others with their type."""
    if isinstance(exc, DispynbError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
