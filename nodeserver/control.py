"""`ControlChannel`: the node server's async end of a computation's control socket.

Messages are framed like everywhere else; worker sockets arrive with SCM_RIGHTS, so
this reads with ``recv_fds`` (tornado streams cannot receive file descriptors).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
from collections.abc import Callable, Sequence

from dispynb.errors import ConnectionClosedError, DispynbError
from dispynb.protocol.framing import Buffer, FrameDecoder, encode_frames
from dispynb.protocol.schema import pack_header, unpack_header
from nodeserver import descriptors
from nodeserver.ipc import IpcMessage, WorkerStarted

logger = logging.getLogger(__name__)

OnMessage = Callable[[IpcMessage, list[memoryview], list[int]], None]


class ControlChannel:
    """Reads messages (and passed fds) from a computation process; sends it messages.

    ``on_message(message, buffers, fds)`` gets the fds passed with `WorkerStarted`
    (the worker's socket, and its pidfd if the message says so), else none; it
    owns them;
    ``on_close()`` runs once at EOF or on a protocol error.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_message: OnMessage,
        on_close: Callable[[], None],
        max_size: int,
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._on_message = on_message
        self._on_close = on_close
        self._decoder = FrameDecoder(max_size)
        self._fds: collections.deque[int] = collections.deque()
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._readable)

    async def send(self, message: IpcMessage, buffers: Sequence[Buffer] = ()) -> None:
        """Send one message (it may be large: a computation bundle)."""
        head, parts = encode_frames([pack_header(message.to_header()), *buffers])
        try:
            for piece in (head, *parts):
                await self._loop.sock_sendall(self._sock, piece)
        except OSError as exc:
            raise ConnectionClosedError(f"computation process gone: {exc}") from exc

    def _readable(self) -> None:
        try:
            data, fds, flags, _addr = socket.recv_fds(
                self._sock, 1 << 16, 16, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            # The process exited with a message of ours unread (a Shutdown sent as
            # its setup failed): its end, as EOF.
            data, fds = b"", []
        except OSError as exc:
            logger.warning("control channel read failed: %s", exc)
            data, fds = b"", []
        self._fds.extend(fds)
        if not data:
            self.close()
            return
        if flags & socket.MSG_CTRUNC:
            # The kernel dropped the worker sockets passed: no descriptor to put
            # them in. The process cannot be served; it ends (its jobs fail).
            logger.warning(
                "a computation process's worker sockets were lost, the node being "
                "out of file descriptors (limit %s): ending it",
                descriptors.limit(),
            )
            self.close()
            return
        try:
            for _prefix, buffers, _signed, _mac in self._decoder.feed(data):
                header = unpack_header(buffers[0], trusted=True)
                message = IpcMessage.from_header(header)
                passed: list[int] = []
                if isinstance(message, WorkerStarted):
                    count = 2 if message.pidfd else 1
                    if len(self._fds) < count:
                        raise IndexError("fewer descriptors than WorkerStarted says")
                    passed = [self._fds.popleft() for _ in range(count)]
                self._on_message(message, buffers[1:], passed)
        except (DispynbError, IndexError) as exc:
            logger.error("bad message from a computation process: %s", exc)
            self.close()

    def close(self) -> None:
        """Stop reading, close the socket and any unclaimed fds; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        while self._fds:
            os.close(self._fds.popleft())
        self._on_close()
