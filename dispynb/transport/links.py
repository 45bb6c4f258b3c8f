"""Byte links under `Connection`: frames in through a `FrameDecoder`, pieces out.

Two implementations of one small interface, both driven by the running asyncio loop
(the second is in `dispynb.transport.tlslink`):

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
from collections.abc import Sequence
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

    @property
    def queued(self) -> int:
        """Pieces of messages waiting behind ``unsent`` (each its objects: many
        small messages take many times their bytes); 0 where not counted."""

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

    @property
    def queued(self) -> int:
        """Pieces of messages waiting behind `unsent` (about three a message)."""
        return len(self._out)

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


#: Names of `dispynb.transport.tlslink` that were this module's, still found here.
_MOVED = frozenset(
    {
        "TLS_CLOSE_GRACE",
        "TLS_SLICE",
        "FrameProtocol",
        "TransportLink",
        "cut_closing_tls_links",
    }
)


def __getattr__(name: str) -> Any:
    if name in _MOVED:  # imported when asked: tlslink imports this module
        from dispynb.transport import tlslink

        return getattr(tlslink, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
