"""`TransportLink`: a `Link` over an asyncio transport, for TLS.

asyncio's SSL support gives a transport, not a socket: `FrameProtocol`, a
buffered protocol, reads what it decrypts into the `FrameSink`'s decoder, as a
`SocketLink` reads a plain socket. What the link writes waits here, uncopied and
counted, and goes to the transport a slice at a time as it takes it (`TLS_SLICE`);
a closed link whose TLS shutdown does not end is cut (`TLS_CLOSE_GRACE`,
`cut_closing_tls_links`).
"""

from __future__ import annotations

import asyncio
import collections
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from dispynb.protocol.auth import RunningMac
from dispynb.protocol.framing import Buffer
from dispynb.transport.links import DrainWaiters, FrameSink


class FrameProtocol(asyncio.BufferedProtocol):
    """An asyncio protocol that reads into a sink's decoder (for `TransportLink`)."""

    def __init__(self, sink: FrameSink) -> None:
        self._sink = sink
        self.transport: asyncio.Transport | None = None
        self._paused = False
        self._drain_waiters = DrainWaiters()
        self.lost = False
        #: Called when the transport takes more (`TransportLink` feeds it then).
        self.on_writable: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """asyncio callback."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        """asyncio callback: where the next bytes go."""
        return self._sink.decoder.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        """asyncio callback: ``nbytes`` arrived."""
        decoder = self._sink.decoder
        self._sink.frames_received(decoder.filled(nbytes))
        if decoder.error is not None:
            if self.transport is not None:
                self.transport.pause_reading()
            self._sink.framing_failed(decoder.error)

    def eof_received(self) -> bool:
        """asyncio callback: the peer closed its side; close ours too."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """asyncio callback."""
        self.lost = True
        self._drain_waiters.wake()
        self._sink.link_lost(exc)

    def pause_writing(self) -> None:
        """asyncio callback: the transport's buffer is over its high-water mark."""
        self._paused = True

    def resume_writing(self) -> None:
        """asyncio callback: the transport's buffer drained below its low-water mark."""
        self._paused = False
        if self.on_writable is not None:
            self.on_writable()
        self._drain_waiters.wake()

    @property
    def paused(self) -> bool:
        """Whether the transport is over its high-water mark."""
        return self._paused

    async def drained(self) -> None:
        """Wait while the transport is paused (as ``StreamWriter.drain``)."""
        if not self._paused or self.lost:
            return
        await self._drain_waiters.wait()

    def wake_writers(self) -> None:
        """Wake the tasks waiting in `drained` or `writable` (the link closed)."""
        self._drain_waiters.wake()

    async def writable(self) -> None:
        """Wait for the next `resume_writing` or the end of the connection."""
        if not self.lost:
            await self._drain_waiters.wait()


#: Most bytes a `TransportLink` hands asyncio's TLS transport at a time. The
#: transport encrypts whatever it is given at once, and moves it all to its socket's
#: own buffer unless that is already full: a ciphertext copy of the whole message
#: that the TLS transport no longer counts (a client that did not read TLS results
#: grew a node by 227 MiB, its back-pressure blind). Fed in slices of this size, and
#: only while the TLS transport holds nothing, asyncio holds at most about two
#: slices and its socket's high-water mark; the rest waits here, uncopied, counted.
TLS_SLICE = 256 * 1024


#: Seconds a closed TLS link waits for the TLS shutdown to finish before its socket is
#: cut. asyncio's SSL transport (3.11) never finishes it when the peer's EOF arrived
#: while reading was paused: it then arms no shutdown timer, stops reading, and is
#: garbage-collected with its socket open.
TLS_CLOSE_GRACE = 5.0


#: TLS links of each loop still in their TLS shutdown (their cut timer pending).
_closing: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[TransportLink]] = (
    weakref.WeakKeyDictionary()
)


def cut_closing_tls_links(loop: asyncio.AbstractEventLoop) -> None:
    """Cut the sockets of ``loop``'s TLS links still in their TLS shutdown.

    For the owner of a loop that stops for good: the links' cut timers would never
    run, and their sockets would be left open for the garbage collector (a client
    closing its last cluster while the node's close_notify was still on its way).
    Run the loop once more afterwards: asyncio closes an aborted socket in a
    callback.
    """
    for link in _closing.pop(loop, ()):
        link._cut_if_open()


class TransportLink:
    """A link over an asyncio transport and its `FrameProtocol` (TLS)."""

    def __init__(self, transport: asyncio.Transport, protocol: FrameProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()
        self._cut: asyncio.TimerHandle | None = None
        #: Bytes written but not handed to the transport yet (see `TLS_SLICE`).
        self._out: collections.deque[memoryview] = collections.deque()
        self._unsent = 0  # bytes of the views in _out
        self._next: asyncio.TimerHandle | None = None  # `_pump`'s next turn
        # Paused as soon as the transport holds anything (its socket's buffer is
        # full), resumed once it holds nothing: then `_pump` gives it the next slice.
        transport.set_write_buffer_limits(high=1, low=0)
        protocol.on_writable = self._pump

    @property
    def closed(self) -> bool:
        """True once the link has ended (or is closing)."""
        return self._protocol.lost or self._transport.is_closing()

    def write(
        self,
        pieces: Sequence[Buffer],
        mac: RunningMac | None = None,
        fds: Sequence[int] = (),
        size: int = -1,
    ) -> None:
        """Hand ``pieces`` (and ``mac``'s digest of them) to the transport."""
        if fds:
            raise ValueError("a TLS link cannot carry file descriptors")
        if self.closed:
            return
        if mac is not None:
            for piece in pieces:
                mac.update(piece)
            pieces = [*pieces, mac.digest()]
        for piece in pieces:
            view = memoryview(piece).cast("B")
            if view.nbytes:
                self._out.append(view)
                self._unsent += view.nbytes
        if self._next is None:
            self._pump()

    def _pump(self) -> None:
        """Hand the transport the next slice of what waits, if it holds nothing.

        One slice a turn of the loop: the transport sends a slice at once when its
        socket's buffer is empty, and a send that meets the peer's reset ends the
        link; the next slice waits for the loop's reads (a timer runs after them), so
        that what the peer said before its reset (a refusal) is read first.
        """
        out = self._out
        if not out or self._protocol.paused or self.closed:
            return
        batch: list[memoryview] = []
        size = 0
        while out and size < TLS_SLICE:
            view = out[0]
            if size + view.nbytes > TLS_SLICE:
                view, out[0] = view[: TLS_SLICE - size], view[TLS_SLICE - size :]
            else:
                out.popleft()
            batch.append(view)
            size += view.nbytes
        self._unsent -= size
        self._transport.writelines(batch)
        if not out:
            self._protocol.wake_writers()
        elif not self._protocol.paused and self._next is None and not self.closed:
            self._next = self._loop.call_later(0, self._pump_later)

    def _pump_later(self) -> None:
        self._next = None
        self._pump()

    async def drained(self) -> None:
        """Wait until all written bytes are with the transport, and the transport's
        own buffer is empty (or the link ended)."""
        while (self._out or self._protocol.paused) and not self.closed:
            await self._protocol.writable()

    @property
    def all_sent(self) -> bool:
        """Whether the transport holds nothing unsent (unknown once it ended)."""
        return (
            not self.closed
            and not self._out
            and self._transport.get_write_buffer_size() == 0
        )

    @property
    def unsent(self) -> int:
        """Bytes written that the transport has not sent yet."""
        if self.closed:
            return 0
        return self._unsent + self._transport.get_write_buffer_size()

    @property
    def queued(self) -> int:
        """Not counted (the transport buffers the bytes): 0."""
        return 0

    def pause_reading(self) -> None:
        """Stop reading until `resume_reading`."""
        if not self.closed:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Read again."""
        if not self.closed:
            self._transport.resume_reading()

    def extra(self, name: str) -> Any:
        """The transport's extra info ``name``."""
        return self._transport.get_extra_info(name)

    def close(self) -> None:
        """Close (idempotent); asyncio flushes what the transport still holds.

        The socket is cut if the TLS shutdown has not ended `TLS_CLOSE_GRACE` s later.
        """
        if self._out and not self.closed:
            # Given to the transport as before, which sends it until the cut.
            self._transport.writelines(self._out)
        self._out.clear()
        self._unsent = 0
        if self._next is not None:
            self._next.cancel()
            self._next = None
        self._transport.close()
        self._protocol.wake_writers()
        if self._cut is None and not (self._protocol.lost or self._loop.is_closed()):
            # The timer also keeps the transport alive until then.
            self._cut = self._loop.call_later(TLS_CLOSE_GRACE, self._cut_if_open)
            _closing.setdefault(self._loop, set()).add(self)

    def _cut_if_open(self) -> None:
        _closing.get(self._loop, set()).discard(self)
        if not self._protocol.lost:
            self._transport.abort()


__all__ = [
    "TLS_CLOSE_GRACE",
    "TLS_SLICE",
    "FrameProtocol",
    "TransportLink",
    "cut_closing_tls_links",
]
