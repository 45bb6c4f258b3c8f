"""What a `Connection` receives: frames checked as they arrive, queued, handed out.

Received frames are cut as they arrive (see `dispynb.transport.links`). A reader either
takes them one at a time with `recv`, or hands the connection a handler with
`dispatch`: each message is then handled inside the socket's read callback, without a
task switch (a loop iteration) per message, which is the hot path of both the client
and the node. Signed frames are checked on arrival, in order (a large one piece by
piece while it arrives, as the sender hashes it while sending); a frame's header is
decoded when it is taken, and its errors surface then, in order. In `recv` mode
reading pauses while too much waits unread. `_link_error` turns socket and TLS
errors into dispynb errors: upper layers never see OSError or ssl.SSLError from a
connection.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import ssl
from collections.abc import Callable
from typing import Any

from dispynb.errors import (
    AuthenticationError,
    ConnectionClosedError,
    DispynbError,
    FramingError,
    MessageError,
    TransportError,
)
from dispynb.protocol.auth import MAC_SIZE, MessageVerifier
from dispynb.protocol.framing import (
    PREFIX_SIZE,
    Body,
    Frame,
    FrameDecoder,
    split_body,
)
from dispynb.protocol.messages import Message, unpack_header
from dispynb.transport.links import Link

#: Reading pauses while this many bytes of received messages wait for `recv`.
INBOX_HIGH = 16 * 1024 * 1024
#: What each received message waiting counts against `INBOX_HIGH` besides its
#: bytes (its objects): 16 MiB of messages of 60 bytes took 70 MiB.
FRAME_COST = 256

#: Received frames up to this size are kept as `Connection.last_frame` for `relay`.
RELAY_MAX = 64 * 1024

#: ``handler(message, buffers) -> stop`` for `Connection.dispatch`.
Handler = Callable[[Message, list[memoryview]], "bool | None"]

#: ``early(frame, waiting)`` for `Connection.dispatch`: a small signed frame before
#: it is decoded, and how many received messages wait behind it.
EarlyHandler = Callable[[Frame, int], None]

#: Marks a frame whose MAC was checked on arrival.
_VERIFIED = object()

#: msgpack's container heads (fixmap, fixarray; array 16/32, map 16/32): an empty
#: list or map is one byte on the wire and some 64 bytes decoded, so a header of
#: 16 MiB of them took 1 GiB and 4 to 12 s of the loop to decode (3 pings of a
#: shared scheduler's user kept every other client out). With `Connection.max_header`
#: set, a header over `_COUNT_FROM` bytes holding more of these bytes than a
#: sixteenth of that cap is refused undecoded (`_containers`: bytes of text
#: past ASCII may count too, which only a header of megabytes of it meets).
_CONTAINER_BYTES = bytes([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
_OTHER_BYTES = bytes(b for b in range(256) if b not in _CONTAINER_BYTES)
_COUNT_FROM = 256 * 1024
_CONTAINER_SHARE = 16


def _containers(header: bytes | memoryview) -> int:
    """At most how many containers (lists, maps) ``header`` decodes to."""
    return len(bytes(header).translate(None, _OTHER_BYTES))


#: A received frame: ``(prefix, count, body, checked)``; ``checked`` is None (it came
#: before signing started), `_VERIFIED`, or the error to raise when it is taken.
_Received = tuple[bytes, int, Body, object]


def _link_error(peer: str, exc: BaseException | None) -> DispynbError:
    """The dispynb error for a link to ``peer`` that ended with ``exc`` (None: the
    peer closed it)."""
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


class _Inbox:
    """`Connection`'s receiving side: what the link hands it, checked, queued and
    handed out in order (`recv`, `dispatch`); the link's `FrameSink` callbacks."""

    # Set by `Connection.__init__` (see there).
    peer: str
    family: type[Message]
    decoder: FrameDecoder
    _trusted: bool
    _verifier: MessageVerifier | None
    _link: Link | None
    _inbox: collections.deque[_Received]
    _partial: list[Any] | None
    _inbox_bytes: int
    _paused: bool
    _held: bool
    _failure: DispynbError | None
    _waiter: asyncio.Future[None] | None
    _handler: Handler | None
    _dispatched: asyncio.Future[None] | None
    _on_bad: Callable[[BadMessageError], None] | None
    _early: EarlyHandler | None
    _delivering: bool
    bytes_received: int
    last_frame: Frame | None
    last_size: int
    max_header: int | None
    reads: int

    @staticmethod
    def _check_header(header: bytes | memoryview, cap: int) -> None:
        """Raise `BadMessageError` for a header over ``cap`` bytes, or holding
        more lists and maps than a sixteenth of it (see `_CONTAINER_BYTES`)."""
        size = len(header)
        if size > cap:
            raise BadMessageError(
                f"message header of {size} bytes, over the {cap}-byte cap of this "
                "side for its peers' headers (arguments and results go in "
                "payload buffers, not capped so)"
            )
        most = cap // _CONTAINER_SHARE
        if size > _COUNT_FROM and (count := _containers(header)) > most:
            raise BadMessageError(
                f"message header of {size} bytes holding up to {count} lists and "
                f"maps, over the {most} this side decodes from its peers (each "
                "takes some 64 bytes of memory and time to decode); refused "
                "undecoded"
            )

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
        if self.max_header is not None:
            self._check_header(buffers[0], self.max_header)
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
