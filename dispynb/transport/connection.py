"""`Connection`: whole dispynb messages over a socket link, signed after auth.

The only module that turns socket and TLS errors into dispynb errors (`_link_error`);
upper layers never see OSError or ssl.SSLError from a connection.

Received frames are cut as they arrive (see `dispynb.transport.links`). A reader either
takes them one at a time with `recv`, or hands the connection a handler with
`dispatch`: each message is then handled inside the socket's read callback, without a
task switch (a loop iteration) per message, which is the hot path of both the client
and the node. Signed frames are checked on arrival, in order (a large one piece by
piece while it arrives, as the sender hashes it while sending); a frame's header is
decoded when it is taken, and its errors surface then, in order. In `recv` mode
reading pauses while too much waits unread.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import fcntl
import logging
import socket
import ssl
import sys
import termios
from collections.abc import Callable, Sequence
from typing import Any

from dispynb.defaults import PRE_AUTH_MAX_FRAME
from dispynb.errors import (
    AuthenticationError,
    ConnectionClosedError,
    DispynbError,
    FramingError,
    MessageError,
    TransportError,
)
from dispynb.protocol.auth import MAC_SIZE, MessageSigner, MessageVerifier
from dispynb.protocol.framing import (
    HEADS,
    PREFIX,
    PREFIX_SIZE,
    Body,
    Buffer,
    Frame,
    FrameDecoder,
    encode_frames,
    split_body,
)
from dispynb.protocol.messages import Message, WireMessage, pack_header, unpack_header
from dispynb.transport.links import Link, SocketLink
from dispynb.transport.tlsaccept import accept_tls
from dispynb.transport.tlslink import FrameProtocol, TransportLink
from dispynb.transport.tlsprotocol import start_tls

logger = logging.getLogger(__name__)

#: Reading pauses while this many bytes of received messages wait for `recv`.
INBOX_HIGH = 16 * 1024 * 1024
#: What each received message waiting counts against `INBOX_HIGH` besides its
#: bytes (its objects): 16 MiB of messages of 60 bytes took 70 MiB.
FRAME_COST = 256

#: Pieces of messages written and not taken by the kernel past which a peer is
#: said not to read (`Connection.unread`), whatever their bytes: about 10,000
#: small messages, some 10 MiB here.
QUEUED_HIGH = 32 * 1024

#: Signed messages from this size on are hashed as they are sent and received, so
#: the MAC overlaps the transfer instead of preceding (sender) or following (receiver)
#: it.
HASH_IN_FLIGHT = 256 * 1024

#: Received frames up to this size are kept as `Connection.last_frame` for `relay`.
RELAY_MAX = 64 * 1024

#: ``handler(message, buffers) -> stop`` for `Connection.dispatch`.
Handler = Callable[[Message, list[memoryview]], "bool | None"]

#: ``early(frame, waiting)`` for `Connection.dispatch`: a small signed frame before
#: it is decoded, and how many received messages wait behind it.
EarlyHandler = Callable[[Frame, int], None]

#: Payload buffers of a message that `Connection.write` frames inline (more: by
#: `encode_frames`).
_FEW = 4

#: Pieces smaller than this are joined before writing: fewer iovecs and MAC updates.
_COALESCE_LIMIT = 64 * 1024


def _link_error(peer: str, exc: BaseException | None) -> DispynbError:
    if exc is None:
        return ConnectionClosedError(f"connection to {peer} closed")
    if isinstance(exc, ssl.SSLError):
        return TransportError(f"TLS failure with {peer}: {exc}")
    if isinstance(exc, DispynbError):
        return exc
    return ConnectionClosedError(f"connection to {peer} failed: {exc}")


class BadMessageError(MessageError):
    """An authenticated peer sent a message this side does not understand (an unknown
    op, or fields of the wrong kind): the frame itself was intact and signed, so the
    connection can go on without it."""


class Connection:
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

    def hold_reading(self, hold: bool) -> None:
        """Stop reading from the peer (``hold``) or read again: back-pressure that
        the owner applies, e.g. while what it would send on is not being taken."""
        if hold == self._held:
            return
        self._held = hold
        link = self._link
        if link is None:
            return
        if hold:
            link.pause_reading()
        elif not self._paused:
            link.resume_reading()

    @property
    def all_sent(self) -> bool:
        """Whether everything written went to the kernel, even if the connection has
        ended since (a peer that read it all and hung up); False when unknown."""
        return self._link is not None and self._link.all_sent

    @property
    def holds_received(self) -> bool:
        """Whether bytes received from the peer wait here, read from the socket but
        not handled yet: a message, or part of one (what is still in the socket is
        the kernel's to say)."""
        return bool(self._inbox) or self._partial is not None or self.decoder.holding

    @property
    def messages_waiting(self) -> int:
        """Messages received and not handled yet: inside a `dispatch` handler, the
        ones that came with the current one (a relay gathers what it passes on)."""
        return len(self._inbox)

    # -- receiving ---------------------------------------------------------------------

    async def recv(self) -> tuple[Message, list[memoryview]]:
        """Receive the next message and its payload buffers.

        Raises `ConnectionClosedError` at EOF, `FramingError`/`MessageError` for bad
        data, `AuthenticationError` for a bad MAC (the caller must then abort).
        """
        inbox = self._inbox
        while not inbox:
            if self._failure is not None:
                raise self._ended()
            if self._waiter is not None or self._handler is not None:
                raise RuntimeError(f"two readers on {self!r}")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._take()

    def _take(self) -> tuple[Message, list[memoryview]]:
        """Check and decode the oldest received frame."""
        prefix, count, body, checked = self._inbox.popleft()
        size = len(body)
        self._inbox_bytes -= size + FRAME_COST
        if self._paused and self._inbox_bytes <= INBOX_HIGH // 2:
            self._paused = False
            if self._link is not None and not self._held:
                self._link.resume_reading()
        self.bytes_received += PREFIX_SIZE + size
        self.last_size = size
        verifier = self._verifier
        if checked is not _VERIFIED and isinstance(checked, DispynbError):
            del body  # not kept alive by the traceback of the error raised here
            raise checked
        if verifier is None:
            buffers = split_body(body, count)[0]
            self.last_frame = None
            header = unpack_header(buffers[0], trusted=self._trusted)
            return self.family.from_header(header), buffers[1:]
        buffers, signed, mac = split_body(body, count, MAC_SIZE)
        self.last_frame = (prefix, count, signed) if size < RELAY_MAX else None
        if checked is not _VERIFIED:
            # It arrived before signing started: only a peer that does not wait for
            # the end of the handshake sends that. Check it now, in turn.
            verifier.check_frame(prefix, signed, mac)
        if self.max_header is not None and len(buffers[0]) > self.max_header:
            raise BadMessageError(
                f"message header of {len(buffers[0])} bytes, over the "
                f"{self.max_header}-byte cap of this side for its peers' headers "
                "(arguments and results go in payload buffers, not capped so)"
            )
        try:
            header = unpack_header(buffers[0], trusted=True)
            return self.family.from_header(header), buffers[1:]
        except MessageError as exc:
            raise BadMessageError(str(exc)) from None

    async def dispatch(
        self,
        handler: Handler,
        on_bad: Callable[[BadMessageError], None] | None = None,
        early: EarlyHandler | None = None,
    ) -> None:
        """Call ``handler(message, buffers)`` for each message, as soon as it arrives.

        Messages are handled in order, on the loop, inside the socket's read callback.
        Returns once ``handler`` returns True (later messages stay for `recv` or the
        next `dispatch`). Raises what `recv` would raise once the connection ends or
        a message is bad, and whatever ``handler`` raises (no message is handled
        after that). With ``on_bad``, a signed message that is intact but not
        understood (`BadMessageError`) goes to ``on_bad`` instead, and dispatch goes on.
        With ``early``, each small signed message is first shown to
        ``early(frame, waiting)`` undecoded (a relay may pass it on with `relay`
        before it decodes it: what waits for it leaves first), then to ``handler``.
        """
        if self._handler is not None or self._waiter is not None:
            raise RuntimeError(f"two readers on {self!r}")
        done = self._dispatched = asyncio.get_running_loop().create_future()
        self._handler = handler
        self._on_bad = on_bad
        self._early = early
        try:
            self._deliver()
            await done
        finally:
            self._handler = self._dispatched = None
            self._on_bad = self._early = None

    def _deliver(self) -> None:
        """Hand queued messages to the dispatch handler; report how dispatch ends."""
        handler, done = self._handler, self._dispatched
        if handler is None or done is None or self._delivering:
            return
        self._delivering = True  # the handler may close the connection: no reentry
        try:
            inbox, early = self._inbox, self._early
            while inbox and not done.done():
                try:
                    if early is not None:
                        prefix, count, body, checked = inbox[0]
                        if checked is _VERIFIED and len(body) < RELAY_MAX:
                            signed = memoryview(body)[: len(body) - MAC_SIZE]
                            early((prefix, count, signed), len(inbox) - 1)
                            del signed
                        del body  # (see frames_received)
                    if handler(*self._take()):
                        done.set_result(None)
                except BadMessageError as exc:
                    if self._on_bad is None:
                        done.set_exception(exc)
                    else:
                        self._on_bad(exc)
                except Exception as exc:
                    done.set_exception(exc)
            if not self._inbox and self._failure is not None and not done.done():
                done.set_exception(self._ended())
        finally:
            self._delivering = False

    async def recv_unsigned_single(self) -> Message:
        """Receive a handshake message: unsigned and without payload buffers."""
        message, buffers = await self.recv()
        if buffers:
            raise FramingError("handshake messages carry no payload")
        return message

    # FrameSink: called by the link, on the loop.

    def frames_received(self, frames: list[Frame]) -> None:
        """Check and queue frames (link callback, after each read)."""
        self.reads += 1
        verifier = self._verifier
        for prefix, count, body in frames:
            checked = None if verifier is None else self._verify(verifier, prefix, body)
            self._inbox.append((prefix, count, body, checked))
            self._inbox_bytes += len(body) + FRAME_COST
        if verifier is not None and self.decoder.big is not None:
            self._hash_partial(verifier)
        if not frames:
            return
        # The bodies are queued: this frame must not hold one while the handler
        # runs, as a failure's traceback keeps the frames it passed through alive
        # (a refused large body would outlive its connection).
        frames.clear()
        del body
        if self._inbox_bytes > INBOX_HIGH and not self._paused:
            self._paused = True
            if self._link is not None:
                self._link.pause_reading()
        if self._waiter is not None:
            self._wake()
        if self._handler is not None:
            self._deliver()

    def _verify(self, verifier: MessageVerifier, prefix: bytes, body: Body) -> object:
        """Check a signed frame on arrival (in arrival order, which is the sequence
        order); return `_VERIFIED` or the error for `_take` to raise."""
        end = len(body) - MAC_SIZE
        if end < 0:
            return FramingError(f"frame of {len(body)} bytes is too short for a MAC")
        partial = self._partial
        view = memoryview(body)
        try:
            if partial is not None and partial[0] is body:
                # Hashed while it arrived: only its tail is left.
                self._partial = None
                _, seq, running, hashed = partial
                running.update(view[hashed:end])
                verifier.check(seq, running, view[end:])
            else:
                verifier.check_frame(prefix, view[:end], view[end:])
        except AuthenticationError as exc:
            # Without this frame's traceback: it holds the refused body (a large
            # one's memory would live on with the error, until a garbage collection).
            return exc.with_traceback(None)
        return _VERIFIED

    def _hash_partial(self, verifier: MessageVerifier) -> None:
        """Hash what arrived of a large frame, while the rest is still in flight."""
        partial = self.decoder.partial()
        if partial is None:
            return
        prefix, body, filled = partial
        state = self._partial
        if state is None or state[0] is not body:
            # after every earlier frame: in order
            seq, running = verifier.start(len(prefix) + len(body) - MAC_SIZE)
            running.update(prefix)
            state = self._partial = [body, seq, running, 0]
        upto = min(filled, len(body) - MAC_SIZE)
        if upto > state[3]:
            state[2].update(memoryview(body)[state[3] : upto])
            state[3] = upto

    def _ended(self) -> DispynbError:
        """What to raise now that the connection has ended: a new copy of its
        failure each time.

        Raising the failure itself added the raising frames to its traceback, call
        after call, and it kept them (and they it: a cycle), with what each was
        given: a node writing result after result to a client killed meanwhile
        held every one (a 200 MiB result stayed in its memory until a collection
        of cycles happened to run, or, for a connection still referred to, as
        long as that lasted)."""
        failure = self._failure
        if failure is None:
            return ConnectionClosedError(f"connection to {self.peer} closed")
        try:
            fresh = copy.copy(failure)
        except Exception:  # an error type that cannot be rebuilt from its args
            return failure.with_traceback(None)  # (holds the last raise's frames)
        fresh.__cause__ = failure.__cause__
        fresh.__suppress_context__ = failure.__suppress_context__
        return fresh

    def framing_failed(self, exc: FramingError) -> None:
        """The peer broke the framing: `recv` raises ``exc`` after earlier messages."""
        if self._failure is None:
            self._failure = exc
        self._wake()
        self._deliver()

    def link_lost(self, exc: BaseException | None) -> None:
        """The link ended (link callback)."""
        if self._failure is None:
            self._failure = _link_error(self.peer, exc)
        # A large frame cut off half-way never completes: let its body go now (a
        # peer that hangs up mid-frame must not leave megabytes held behind it).
        self._partial = None
        self.decoder.drop_partial()
        self._wake()
        self._deliver()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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


#: Marks a frame whose MAC was checked on arrival.
_VERIFIED = object()

#: A received frame: ``(prefix, count, body, checked)``; ``checked`` is None (it came
#: before signing started), `_VERIFIED`, or the error to raise when it is taken.
_Received = tuple[bytes, int, Body, object]


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
