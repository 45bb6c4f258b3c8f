"""Byte links under `Connection`: frames in through a `FrameDecoder`, pieces out.

Two implementations of one small interface, both driven by the running asyncio loop:

`SocketLink`
    A plain TCP or Unix stream socket, without asyncio's transport layer. Its reader
    stays registered for the life of the link (no epoll_ctl per message), reads go
    straight into the decoder's buffer (a large payload into its final place), and a
    message leaves in one ``sendmsg`` of all its pieces (writev, no join of large
    buffers); what the kernel does not take waits, uncopied, for the socket to drain.
`TransportLink`
    Any asyncio transport (used for TLS, via asyncio's SSL support), fed through
    `FrameProtocol`, a buffered protocol reading into the same decoder. What it
    writes waits here, uncopied and counted, and goes to the transport a slice at
    a time as it takes it (`TLS_SLICE`).

Both report to a `FrameSink` (the `Connection`): frames as they complete, a framing
error (reading then stops), and the end of the link. Neither raises on write: a
failed send ends the link, which the sink hears about.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import errno
import resource
import socket
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from dispynb.errors import FramingError
from dispynb.protocol.auth import RunningMac
from dispynb.protocol.framing import Buffer, Frame, FrameDecoder, buffers_size

#: Most iovecs one sendmsg call takes (Linux IOV_MAX).
IOV_MAX = 1024

#: Most reads of what a peer sent before a reset (`SocketLink._read_rest`): a
#: receive buffer's worth (a few MiB) in pieces of at least a chunk.
_REST_READS = 256

#: A good `FrameSink.read_lowat` for a reader of large frames over TCP: it is woken
#: once this many bytes of a large frame's body are queued, or all that is left of
#: it (``SO_RCVLOWAT``), not for every few segments: fewer wake-ups, reads and MAC
#: updates per megabyte. The kernel still wakes it early when its receive buffer or
#: the peer's window runs short. 1 MiB: in cross-host W4 runs alternated with 256
#: KiB (9 each, 2026-12-04 09:00-09:10Z) the node servers' CPU per MB was about the
#: same (0.51 against 0.49 ms/MB: a piece no longer fits a core's L2 when hashed),
#: the sending client's fell from 0.41 to 0.35 ms/MB, and W4 / raw TCP rose from
#: 0.63 to 0.70 (medians); 512 KiB and 2 MiB were no better.
READ_LOWAT = 1024 * 1024


class DrainWaiters:
    """Tasks waiting for a link's unsent bytes to drain (woken all at once)."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        """Wait until `wake`."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def wake(self) -> None:
        """Wake every waiter (drained, or the link ended)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class FrameSink(Protocol):
    """What a link reports to (implemented by `Connection`)."""

    decoder: FrameDecoder
    #: While a large frame's body arrives over TCP, read it only once this many of
    #: its bytes (or all that is left of it) are queued; 0 reads whatever arrived.
    #: Only for a reader that need not see a slow large frame's progress (reads
    #: then come at most every ``read_lowat`` bytes).
    read_lowat: int

    def frames_received(self, frames: list[Frame]) -> None:
        """After each read: the frames it completed, in order (maybe none)."""

    def framing_failed(self, exc: FramingError) -> None:
        """The peer sent a bad frame; the link reads no more."""

    def link_lost(self, exc: BaseException | None) -> None:
        """The link ended: EOF (``exc`` None), an error, or a local close."""


class Link(Protocol):
    """What `Connection` needs from a link."""

    @property
    def closed(self) -> bool:
        """True once the link has ended."""

    def write(
        self,
        pieces: Sequence[Buffer],
        mac: RunningMac | None = None,
        fds: Sequence[int] = (),
        size: int = -1,
    ) -> None:
        """Send ``pieces`` in order, then ``mac``'s digest of them if given, and
        ``fds`` with the first byte (Unix sockets only); never blocks, never raises
        for a dead peer. ``size``: the bytes of ``pieces``, if the caller knows."""

    async def drained(self) -> None:
        """Wait until all written bytes are with the kernel (or the link ended)."""

    @property
    def all_sent(self) -> bool:
        """Whether every byte written went to the kernel (before the end, if it
        ended); False when that cannot be told."""

    @property
    def unsent(self) -> int:
        """Bytes written that the kernel has not taken yet (0 once ended)."""

    def pause_reading(self) -> None:
        """Stop reading until `resume_reading` (backpressure on the peer)."""

    def resume_reading(self) -> None:
        """Read again."""

    def extra(self, name: str) -> Any:
        """``sockname``, ``peername`` or ``ssl_object`` (None if not applicable)."""

    def close(self) -> None:
        """Close at once (idempotent); bytes the kernel has not taken are dropped."""


def set_nodelay(sock: socket.socket) -> None:
    """Our messages are whole: never wait for more bytes (TCP sockets only)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def unchecked(exc: Exception) -> str:
    """Why a frame that arrived could not be checked (``exc``: this process's own
    trouble, not the peer's)."""
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = "none" if soft == resource.RLIM_INFINITY else soft
        whose = "system" if exc.errno == errno.ENFILE else f"process (limit {limit})"
        return (
            f"a message could not be checked: the receiving {whose} is out of "
            f"file descriptors ({exc.strerror}); raise its limit (ulimit -n, "
            "LimitNOFILE=)"
        )
    return f"a message could not be checked: {type(exc).__name__}: {exc}"


class SocketLink:
    """A non-blocking stream socket driven by ``add_reader``/``add_writer``."""

    def __init__(self, sock: socket.socket, sink: FrameSink) -> None:
        sock.setblocking(False)
        set_nodelay(sock)
        self._sock = sock
        self._fd = sock.fileno()
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        #: Unsent bytes: ``[view, mac, fds]`` (feed ``mac`` the view once sent; send
        #: ``fds``, if any, with its first byte) or ``[None, mac, ()]`` (send
        #: ``mac``'s digest here).
        self._out: collections.deque[list[Any]] = collections.deque()
        self._unsent = 0  # bytes of the views in _out
        self._writing = False  # the writer callback is registered
        self._drain_waiters = DrainWaiters()
        #: True once the link has ended (an attribute: every write checks it).
        self.closed = False
        self._dropped = False  # it ended with bytes the kernel had not taken
        self._reading = True
        self._names = (_sockname(sock, "getsockname"), _sockname(sock, "getpeername"))
        #: The socket's SO_RCVLOWAT (1, the default), or 0 where it is not used (a
        #: Unix socket, whose readiness ignores it).
        self._lowat = 1 if sock.family in (socket.AF_INET, socket.AF_INET6) else 0
        self._loop.add_reader(self._fd, self._readable)

    @property
    def all_sent(self) -> bool:
        """Whether every byte written went to the kernel (before the end, if any)."""
        return not self._dropped if self.closed else not self._out

    @property
    def unsent(self) -> int:
        """Bytes written that the kernel has not taken yet."""
        return self._unsent

    # -- reading -----------------------------------------------------------------------

    def _readable(self) -> None:
        decoder = self._sink.decoder
        try:
            count = self._sock.recv_into(decoder.buffer())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose(exc)
            return
        if not count:
            self._lose(None)
            return
        try:
            self._sink.frames_received(decoder.filled(count))
        except Exception as exc:
            # Not the peer's doing: a check of its frame could not run (a lazy
            # import at the descriptor limit, memory). Left readable, it failed at
            # every read, its frame never done: the stream is unusable now, as
            # after a frame that cannot be taken, and the peer may be told why.
            self.pause_reading()
            self._sink.framing_failed(FramingError(unchecked(exc)))
            return
        if decoder.error is not None:
            self.pause_reading()
            self._sink.framing_failed(decoder.error)
        elif self._lowat and self._sink.read_lowat:
            self._wake_at(decoder, self._sink.read_lowat)

    def _wake_at(self, decoder: FrameDecoder, most: int) -> None:
        """Set the socket's low-water mark for the next read: ``most`` bytes, or the
        rest of the large frame being received if less; 1 between large frames."""
        partial = decoder.partial()
        lowat = 1 if partial is None else min(len(partial[1]) - partial[2], most)
        if lowat != self._lowat and not self.closed:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            except OSError:
                self._lowat = 0  # not supported here: wake on every byte, as before
                return
            self._lowat = lowat

    def pause_reading(self) -> None:
        """Stop reading until `resume_reading`."""
        if self._reading and not self.closed:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        """Read again."""
        if not self._reading and not self.closed:
            self._reading = True
            self._loop.add_reader(self._fd, self._readable)

    # -- writing -----------------------------------------------------------------------

    def write(
        self,
        pieces: Sequence[Buffer],
        mac: RunningMac | None = None,
        fds: Sequence[int] = (),
        size: int = -1,
    ) -> None:
        """Send ``pieces`` now with one ``sendmsg``; queue (uncopied) what is left.

        With ``mac``, the pieces are fed to it as they leave, and its digest is sent
        after them: a large message is hashed while it is in flight, not before.
        ``fds`` go with the first byte (SCM_RIGHTS), so a reader gets them no later
        than the message; they must stay open until the link has drained.
        ``size``: the bytes of ``pieces``, if the caller knows them (not counted
        again).
        """
        if self.closed:
            return
        if self._out:
            self._queue(pieces, mac, fds)
            return
        try:
            sent = self._sock.sendmsg(
                pieces[:IOV_MAX], _rights(fds) if fds else _NO_ANCDATA
            )
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lose(exc)
            return
        if mac is None and sent == (size if size >= 0 else buffers_size(pieces)):
            return  # the usual case: all of it in one system call
        self._queue(pieces, mac, () if sent else fds)
        self._consume(sent)
        self._pump()

    def _queue(
        self, pieces: Sequence[Buffer], mac: RunningMac | None, fds: Sequence[int]
    ) -> None:
        for piece in pieces:
            view = memoryview(piece).cast("B")
            if view.nbytes:
                self._out.append([view, mac, fds])
                self._unsent += view.nbytes
                fds = ()
        if mac is not None:
            self._out.append([None, mac, ()])  # its digest, once the pieces are hashed

    def _consume(self, sent: int) -> None:
        """Drop ``sent`` bytes from the front of the queue, hashing what needs it."""
        out = self._out
        self._unsent = max(self._unsent - sent, 0)  # a digest's bytes were not counted
        while sent:
            entry = out[0]
            view, mac, _ = entry
            assert view is not None
            entry[2] = ()  # its first byte, and so its descriptors, went
            if sent >= len(view):
                sent -= len(view)
                out.popleft()
                if mac is not None:
                    mac.update(view)
            else:
                entry[0] = view[sent:]
                if mac is not None:
                    mac.update(view[:sent])
                return

    def _pump(self) -> None:
        """Send queued bytes until the socket is full or the queue is empty."""
        out = self._out
        while out:
            iov: list[memoryview] = []
            fds: Sequence[int] = out[0][2]
            for entry in out:
                if entry[2] and iov:
                    break  # descriptors go with their message's first byte
                view = entry[0]
                if view is None:
                    if iov:
                        break  # the digest needs the bytes before it hashed first
                    mac = entry[1]
                    assert mac is not None
                    view = entry[0] = memoryview(mac.digest())
                    entry[1] = None
                iov.append(view)
                if len(iov) == IOV_MAX:
                    break
            try:
                sent = self._sock.sendmsg(iov, _rights(fds))
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._writing = True
                    self._loop.add_writer(self._fd, self._pump)
                return
            except OSError as exc:
                self._lose(exc)
                return
            self._consume(sent)
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        self._drain_waiters.wake()

    async def drained(self) -> None:
        """Wait until the queue of unsent bytes is empty (or the link ended)."""
        if not self._out or self.closed:
            return
        await self._drain_waiters.wait()

    # -- the rest ----------------------------------------------------------------------

    def extra(self, name: str) -> Any:
        """``sockname`` or ``peername`` (kept after close), ``socket``, else None."""
        if name == "socket":
            return None if self.closed else self._sock
        if name == "sockname":
            return self._names[0]
        if name == "peername":
            return self._names[1]
        return None

    def close(self) -> None:
        """Close at once (idempotent)."""
        self._lose(None)

    def _lose(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        if exc is not None and self._reading:
            self._read_rest()
        self.closed = True
        self._dropped = bool(self._out)
        if self._reading:
            self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
        self._out.clear()
        self._unsent = 0
        self._sock.close()
        self._drain_waiters.wake()
        self._sink.link_lost(exc)

    def _read_rest(self) -> None:
        """The link failed (a write met the peer's reset): deliver what the peer
        sent before, still in the kernel's receive queue (Linux keeps it after a
        reset). A peer that refuses a session says why and closes, and its close
        resets the connection if our next message was arriving meanwhile: the
        write that met that reset must not hide the reason (a scheduler's 'over
        your --max_sessions' came out as 'Broken pipe')."""
        decoder = self._sink.decoder
        for _ in range(_REST_READS):
            if decoder.error is not None:
                return
            try:
                count = self._sock.recv_into(decoder.buffer())
            except OSError:
                return
            if not count:
                return
            self._sink.frames_received(decoder.filled(count))


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


_NO_ANCDATA: list[tuple[int, int, Any]] = []


def _rights(fds: Sequence[int]) -> list[tuple[int, int, Any]]:
    """``sendmsg``'s ancillary data carrying ``fds`` (none: no list made)."""
    if not fds:
        return _NO_ANCDATA
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]


def _sockname(sock: socket.socket, method: str) -> Any:
    try:
        return getattr(sock, method)()
    except OSError:
        return None
