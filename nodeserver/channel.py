"""Blocking message I/O over a Unix stream socket, for the node's internal channels.

The computation process and its workers are plain blocking programs; this is their end
of the channels described in `nodeserver.ipc`. Frames are those of the wire protocol
(`dispynb.protocol.framing`) without a MAC: both ends are processes of the node. The
node server's (asyncio) end only has to produce and parse the same frames.

File descriptors (a new worker's socket, a job's shared arguments) travel with
SCM_RIGHTS, attached to the first byte of the message they belong to; read them with
`MessageSocket.recv_with_fds`, or, on a socket made with ``fds=True``, with
`MessageSocket.take_fd` after the message.
"""

from __future__ import annotations

import array
import collections
import contextlib
import select
import socket
from collections.abc import Sequence
from typing import TypeAlias

from dispynb.defaults import MAX_MESSAGE_SIZE
from dispynb.errors import ConnectionClosedError, FramingError
from dispynb.protocol.framing import (
    PREFIX,
    PREFIX_SIZE,
    Buffer,
    Frame,
    FrameDecoder,
    encode_frames,
    parse_prefix,
    split_body,
)
from dispynb.protocol.schema import pack_header, unpack_header
from nodeserver.ipc import IpcMessage

#: Most iovecs one sendmsg call takes (Linux IOV_MAX).
_IOV_MAX = 1024

_AncData: TypeAlias = list[tuple[int, int, "array.array[int]"]]

# Plain ints: the socket module's flags are IntFlag members, whose ``|`` and ``&``
# run Python code (enum's), and these are combined on every message.
_CMSG_FLAGS = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)

#: Most descriptors one read keeps (the node sends one per message).
_MAX_FDS = 8
_FDS_SPACE = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)


class MessageSocket:
    """Whole `IpcMessage` messages over a blocking Unix stream socket.

    Parameters
    ----------
    sock:
        A connected ``AF_UNIX`` ``SOCK_STREAM`` socket; owned (closed) by this object.
    max_size:
        Largest message body accepted, checked before allocating it.
    fds:
        Keep the descriptors that arrive with messages (`take_fd`), in order; a
        worker's socket, whose `Run` messages may bring one.

    Notes
    -----
    A socket timeout (``sock.settimeout``) raises `TimeoutError` unchanged; the stream
    may then be in the middle of a message, so the caller should close it.
    """

    def __init__(
        self, sock: socket.socket, max_size: int = MAX_MESSAGE_SIZE, fds: bool = False
    ) -> None:
        self.sock = sock
        self.max_size = max_size
        self._prefix = bytearray(PREFIX_SIZE)
        self._prefix_view = memoryview(self._prefix)
        # One recv usually brings a whole message (a large one lands in its own
        # buffer); messages read ahead wait here.
        self._decoder = FrameDecoder(max_size)
        self._ready: collections.deque[Frame] = collections.deque()
        #: Descriptors received (``fds=True``), in the order of their messages.
        self._fds: collections.deque[int] | None = collections.deque() if fds else None
        #: A read's descriptors were cut short (more than `_MAX_FDS`): lost.
        self.fds_lost = False
        self._poller: select.poll | None = None  # `wait`'s, made at its first call

    def send(
        self,
        message: IpcMessage,
        buffers: Sequence[Buffer] = (),
        fds: Sequence[int] = (),
    ) -> None:
        """Send ``message`` with its payload ``buffers`` and, optionally, ``fds``.

        Buffers are written with scatter/gather I/O, never joined. Raises
        `ConnectionClosedError` when the peer is gone.
        """
        header = pack_header(message.to_header())
        head, parts = encode_frames([header, *buffers])
        total = PREFIX_SIZE + PREFIX.unpack_from(head)[0]
        pieces: list[Buffer] = [head, *parts]
        ancdata: _AncData = []
        if fds:
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            sent = 0
            if len(pieces) <= _IOV_MAX:
                sent = self.sock.sendmsg(pieces, ancdata)
                if sent == total:  # the usual case: one system call
                    return
                ancdata = []
            self._send_rest(pieces, sent, ancdata)
        except TimeoutError:
            raise
        except OSError as exc:
            raise _closed(exc) from exc

    def _send_rest(self, pieces: list[Buffer], sent: int, ancdata: _AncData) -> None:
        """Send what is left of ``pieces`` after ``sent`` bytes (partial or huge)."""
        views = [memoryview(p).cast("B") for p in pieces]
        index = 0
        while True:
            while index < len(views) and sent >= len(views[index]):
                sent -= len(views[index])
                index += 1
            if index == len(views):
                return
            if sent:
                views[index] = views[index][sent:]
            sent = self.sock.sendmsg(views[index : index + _IOV_MAX], ancdata)
            ancdata = []

    def recv(self) -> tuple[IpcMessage, list[memoryview]]:
        """Receive the next message and its payload buffers (views of one bytearray).

        Raises `ConnectionClosedError` at EOF, `FramingError` or `MessageError` for
        bad data. File descriptors sent with the message are lost (closed by the
        kernel); use `recv_with_fds` where some are expected.
        """
        while not self._ready:
            if self._decoder.error is not None:
                raise self._decoder.error
            self._read(0)
        return self._decode(self._ready.popleft())

    @property
    def buffered(self) -> bool:
        """Whether a whole message was already read ahead: a selector waiting on the
        socket would not see it, so take it with `recv` first."""
        return bool(self._ready)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until something can be read (a message, more of one, the end or an
        error) or ``timeout`` seconds passed; True unless the time ran out.

        A blocking read of a Unix stream socket sleeps on the socket's one wait
        queue, which the kernel also wakes each time the peer takes bytes this end
        sent ("write space", whether a writer waits or not): a worker waiting for
        its next job was woken, and put back to sleep, each time the node server
        read the result of the last one, a second context switch per job and, with
        the node server on the other CPU, a wake-up across CPUs in the middle of
        the node's work (W2). ``poll`` for POLLIN only is not woken by that.
        """
        if self._ready or self._decoder.error is not None:
            return True
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(None if timeout is None else timeout * 1000))

    def poll(self) -> bool:
        """True if a whole message can be received now, without blocking."""
        if not self._ready and self._decoder.error is None:
            if self.sock.gettimeout() is not None:
                # In timeout mode a would-block read waits: ask select instead.
                if not select.select([self.sock], [], [], 0)[0]:
                    return False
                self._read(0)
            else:
                # Not contextlib.suppress: this runs before every job.
                try:  # noqa: SIM105
                    self._read(_MSG_DONTWAIT)
                except BlockingIOError:
                    pass
        return bool(self._ready)

    def _read(self, flags: int) -> None:
        """One recv into the decoder; whole messages go to the ready queue."""
        decoder = self._decoder
        try:
            if self._fds is None:
                count = self.sock.recv_into(decoder.buffer(), 0, flags)
            else:
                count = self._recv_keeping_fds(decoder.buffer(), flags)
        except (TimeoutError, BlockingIOError):
            raise
        except OSError as exc:
            raise _closed(exc) from exc
        if not count:
            got, size = decoder.pending, decoder.expected
            raise ConnectionClosedError(
                "internal channel closed by the peer"
                + (f" after {got} of {size} bytes" if got else "")
            )
        self._ready.extend(decoder.filled(count))

    def _recv_keeping_fds(self, buffer: memoryview, flags: int) -> int:
        """``recv_into`` that keeps the descriptors arriving with the bytes (the
        kernel ends a read after the bytes that bring descriptors, so each message's
        come no later than its last byte)."""
        assert self._fds is not None
        count, ancdata, msg_flags, _ = self.sock.recvmsg_into(
            [buffer], _FDS_SPACE, flags | _CMSG_FLAGS
        )
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self._fds.extend(fds)
        if msg_flags & _MSG_CTRUNC:
            self.fds_lost = True
        return count

    def take_fd(self) -> int | None:
        """The oldest descriptor received and not yet taken (the caller owns it),
        or None (none came: the sender sent none, or they were lost)."""
        if not self._fds:
            return None
        return self._fds.popleft()

    @staticmethod
    def _decode(frame: Frame) -> tuple[IpcMessage, list[memoryview]]:
        _prefix, count, body = frame
        buffers, _, _ = split_body(body, count)
        header = unpack_header(buffers[0], trusted=True)
        return IpcMessage.from_header(header), buffers[1:]

    def recv_with_fds(
        self, max_fds: int = 16
    ) -> tuple[IpcMessage, list[memoryview], list[int]]:
        """Like `recv`, also returning the file descriptors sent with the message.

        The caller owns the returned descriptors (close-on-exec is set on Linux).
        Raises `FramingError` if more than ``max_fds`` arrive (they are then lost).
        """
        if self._ready or self._decoder.pending:
            # Read ahead with `recv`: its descriptors are gone. Do not mix the two.
            message, buffers = self.recv()
            return message, buffers, []
        fds: list[int] = []
        got = 0
        while got < PREFIX_SIZE:
            try:
                data, more, flags, _ = socket.recv_fds(
                    self.sock, PREFIX_SIZE - got, max_fds, _CMSG_FLAGS
                )
            except TimeoutError:
                _close_fds(fds)
                raise
            except OSError as exc:
                _close_fds(fds)
                raise _closed(exc) from exc
            fds.extend(more)
            if flags & _MSG_CTRUNC:
                _close_fds(fds)
                raise FramingError(f"more than {max_fds} file descriptors received")
            if not data:
                _close_fds(fds)
                raise ConnectionClosedError("internal channel closed by the peer")
            self._prefix[got : got + len(data)] = data
            got += len(data)
        try:
            message, buffers = self._recv_body()
        except BaseException:
            _close_fds(fds)
            raise
        return message, buffers, fds

    def _recv_body(self) -> tuple[IpcMessage, list[memoryview]]:
        size, count = parse_prefix(self._prefix, self.max_size)
        body = bytearray(size)
        self._recv_exact(memoryview(body))
        buffers, _, _ = split_body(body, count)
        header = unpack_header(buffers[0], trusted=True)
        return IpcMessage.from_header(header), buffers[1:]

    def _recv_exact(self, view: memoryview) -> None:
        """Fill ``view`` from the socket."""
        size = len(view)
        got = 0
        recv_into = self.sock.recv_into
        try:
            while got < size:
                count = recv_into(view[got:] if got else view)
                if not count:
                    raise ConnectionClosedError(
                        "internal channel closed by the peer"
                        + (f" after {got} of {size} bytes" if got else "")
                    )
                got += count
        except TimeoutError:
            raise
        except OSError as exc:
            raise _closed(exc) from exc

    def fileno(self) -> int:
        """The socket's file descriptor (-1 once closed)."""
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket (idempotent) and any descriptors not taken."""
        self.sock.close()
        if self._fds:
            _close_fds(list(self._fds))
            self._fds.clear()

    def __repr__(self) -> str:
        return f"<MessageSocket fd={self.fileno()}>"


def _closed(exc: OSError) -> ConnectionClosedError:
    return ConnectionClosedError(f"internal channel failed: {exc}")


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            socket.close(fd)
