"""`MonitorHTTPServer`: tornado's HTTP server, bounded in the connections it holds.

A web monitor lives in the user's client process, beside the cluster's node
connections and files, and anyone on the machine may connect to it before any token
is checked. tornado's server holds every connection it accepts, for as long as a
client keeps sending headers slowly, and retries a failing accept at once: a local
user holding a few hundred idle connections took the process's descriptors, and
the monitor's loop then spun on EMFILE logging a traceback per try (238,000
tracebacks, 146 MB of log, in 40 s). Here:

- at most `MAX_CONNECTIONS` are held: a new connection past that closes the one
  that has waited longest for a request, or for its peer to read its answer (a
  request still being answered, such as a browser's long-poll, is never closed), so
  idle, slow or never-reading clients cannot lock the user out (a peer that
  pipelines requests and reads no answer kept each of its connections busy);
- an accept that fails for lack of descriptors closes that longest-waiting
  connection and, if none can go, pauses accepting with a growing delay (one
  warning, then one line when it ends);
- tornado's own line for each connection it drops (a malformed request, headers
  over the limit, a body too slow, a failed TLS handshake), which anyone who can
  connect could write as fast as they connect, is counted per address (`Tally`:
  3 lines, then one a minute, and one with the count left at the stop).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Iterable
from typing import Any

import tornado.httpserver
import tornado.httputil
import tornado.iostream
from tornado.http1connection import HTTP1ServerConnection
from tornado.ioloop import IOLoop

from dispynb.protocol.handshake import peer_text
from dispynb.transport.admission import Tally

logger = logging.getLogger("dispynb.httpd")

#: Connections held at once (a browser opens at most 6 to one server).
MAX_CONNECTIONS = 64

#: accept() errors that mean "out of a resource": retrying at once would spin.
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_RETRY_FIRST = 0.05
_RETRY_MAX = 1.0
#: Connections accepted per wake-up of a listening socket.
_ACCEPT_BATCH = 16


class MonitorHTTPServer(tornado.httpserver.HTTPServer):
    """An `HTTPServer` holding at most ``max_connections`` connections.

    Takes `HTTPServer`'s arguments plus ``max_connections``. Listen with
    `add_sockets` (its own accept loop: see the module).
    """

    def initialize(
        self, *args: Any, max_connections: int = MAX_CONNECTIONS, **kwargs: Any
    ) -> None:
        super().initialize(*args, **kwargs)
        self.max_connections = max_connections
        # Connection -> when it began to wait for a request (or for its peer to
        # read an answer complete but not yet sent); None while a request is being
        # received or answered. Insertion order is irrelevant (min by time).
        self._waiting_since: dict[object, float | None] = {}
        self._listening: list[socket.socket] = []
        self._retry_delay = _RETRY_FIRST
        self._paused_since: float | None = None
        self._failed_accepts = 0
        self._dropped_lines: _DroppedLines | None = None

    # -- accepting ---------------------------------------------------------------------

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        """Accept connections on ``sockets`` (on the current loop)."""
        if self._dropped_lines is None:
            loop = IOLoop.current().asyncio_loop  # type: ignore[attr-defined]
            self._dropped_lines = _DroppedLines(loop)
            _TORNADO_LOG.addFilter(self._dropped_lines)
        for sock in sockets:
            sock.setblocking(False)
            self._sockets[sock.fileno()] = sock
            self._listening.append(sock)
            self._watch(sock)

    def _watch(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        IOLoop.current().add_handler(sock, lambda *_: self._accept(sock), IOLoop.READ)
        self._handlers[fd] = lambda: self._unwatch(sock)

    @staticmethod
    def _unwatch(sock: socket.socket) -> None:
        IOLoop.current().remove_handler(sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                connection, address = sock.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _EXHAUSTED:
                    raise
                if self._evict_one():  # frees a descriptor: try again
                    continue
                self._pause(exc)
                return
            self._resumed()
            self._handle_connection(connection, address)

    def stop(self) -> None:
        """Stop listening (idempotent); a paused socket has no handler to remove."""
        for sock in self._listening:
            self._handlers.setdefault(sock.fileno(), lambda: None)
        super().stop()
        if self._dropped_lines is not None:
            _TORNADO_LOG.removeFilter(self._dropped_lines)
            self._dropped_lines.tally.close()
            self._dropped_lines = None

    def _pause(self, exc: OSError) -> None:
        """Stop watching the sockets for a while instead of failing at once again."""
        self._failed_accepts += 1
        if self._paused_since is None:
            self._paused_since = time.monotonic()
            logger.warning(
                "web monitor: cannot accept connections (%s): paused; the process "
                "is out of file descriptors",
                exc.strerror or exc,
            )
        for sock in self._listening:
            self._handlers.pop(sock.fileno(), lambda: None)()
        IOLoop.current().call_later(self._retry_delay, self._resume)
        self._retry_delay = min(2 * self._retry_delay, _RETRY_MAX)

    def _resume(self) -> None:
        if self._stopped:
            return
        for sock in self._listening:
            if sock.fileno() not in self._handlers:
                self._watch(sock)

    def _resumed(self) -> None:
        if self._paused_since is not None:
            logger.warning(
                "web monitor: accepting connections again after %.1f s "
                "(%d failed accepts)",
                time.monotonic() - self._paused_since,
                self._failed_accepts,
            )
        self._paused_since = None
        self._failed_accepts = 0
        self._retry_delay = _RETRY_FIRST

    # -- holding connections -----------------------------------------------------------

    def handle_stream(
        self, stream: tornado.iostream.IOStream, address: tuple[Any, ...]
    ) -> None:
        """Serve the new connection, closing another if there are too many."""
        if len(self._connections) >= self.max_connections and not self._evict_one():
            stream.close()  # every connection is answering a request
            return
        super().handle_stream(stream, address)
        # The connection just added (the set's only member not yet in the dict).
        for conn in self._connections:
            if conn not in self._waiting_since:
                self._waiting_since[conn] = time.monotonic()

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for a request, if any."""
        waiting = [(t, c) for c, t in self._waiting_since.items() if t is not None]
        if not waiting:
            return False
        _, conn = min(waiting, key=lambda item: item[0])
        del self._waiting_since[conn]
        assert isinstance(conn, HTTP1ServerConnection)
        conn.stream.close()  # tornado's on_close follows
        return True

    def start_request(
        self, server_conn: object, request_conn: tornado.httputil.HTTPConnection
    ) -> tornado.httputil.HTTPMessageDelegate:
        """The connection now waits for a request; busy once it is received."""
        conn = server_conn
        if conn in self._waiting_since:
            self._waiting_since[conn] = time.monotonic()
        answering = _Answering(request_conn, lambda: self._answered(conn))
        delegate = super().start_request(server_conn, answering)
        stream = server_conn.stream  # type: ignore[attr-defined]
        return _Received(delegate, lambda: self._busy(conn), stream)

    def _busy(self, conn: object) -> None:
        if conn in self._waiting_since:
            self._waiting_since[conn] = None

    def _answered(self, conn: object) -> None:
        """The answer is complete: what is left is its peer's to read."""
        if conn in self._waiting_since:
            self._waiting_since[conn] = time.monotonic()

    async def close_all_connections(self) -> None:
        """Close every connection at once, then wait for each to end. tornado's
        closes one at a time, serving the others meanwhile: clients that pipeline
        requests without reading their answers kept it busy past its bound."""
        for conn in list(self._connections):
            conn.stream.close()
        await super().close_all_connections()

    def on_close(self, server_conn: object) -> None:
        """tornado's bookkeeping, and ours."""
        self._waiting_since.pop(server_conn, None)
        super().on_close(server_conn)


#: Where tornado logs the connections it drops (`_DroppedLines`).
_TORNADO_LOG = logging.getLogger("tornado.general")


class _DroppedLines(logging.Filter):
    """Counts tornado's lines below ERROR logged on ``loop`` (a monitor's) instead
    of letting each through: each says a peer's connection was dropped, and anyone
    could write them at will (one per connection, before any token is checked)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self.tally = Tally(logger, level=logging.INFO)

    def filter(self, record: logging.LogRecord) -> bool:
        """False (counted here) for the monitor's loop's lines below ERROR."""
        if record.levelno >= logging.ERROR:
            return True
        try:
            if asyncio.get_running_loop() is not self._loop:
                return True  # another server's, in this process
        except RuntimeError:
            return True
        args = record.args
        source = "a peer"
        if " from %s" in str(record.msg) and isinstance(args, tuple) and args:
            source = str(getattr(args[0], "remote_ip", None) or args[0])
        detail = peer_text(record.getMessage())
        self.tally.event("web connections dropped", source, detail)
        return False


class _Answering(tornado.httputil.HTTPConnection):
    """A request's connection (as its handler sees it) that calls ``on_answered``
    once the handler has finished its answer, whether or not the peer reads it."""

    def __init__(
        self, inner: tornado.httputil.HTTPConnection, on_answered: Any
    ) -> None:
        self._inner = inner
        self._on_answered = on_answered

    def write_headers(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.write_headers(*args, **kwargs)

    def write(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.write(*args, **kwargs)

    def finish(self) -> None:
        self._inner.finish()
        self._on_answered()

    def __getattr__(self, name: str) -> Any:  # context, set_close_callback...
        return getattr(self._inner, name)


class _Received(tornado.httputil.HTTPMessageDelegate):
    """Passes a request on, calling ``on_received`` once it is fully received (a
    client dripping its headers or body still counts as waiting).

    A request read from a connection already closed goes nowhere: tornado goes on
    parsing the requests a client pipelined into its buffer after the connection
    closed, and each ran its handler (a snapshot each, hundreds per connection:
    a shutdown then took over its 30 s bound with clients that never read).
    """

    def __init__(
        self,
        inner: tornado.httputil.HTTPMessageDelegate,
        on_received: Any,
        stream: tornado.iostream.IOStream,
    ) -> None:
        self._inner = inner
        self._on_received = on_received
        self._stream = stream
        self._gone = False

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine
        | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        self._gone = self._stream.closed()
        if self._gone:
            return None
        return self._inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return None if self._gone else self._inner.data_received(chunk)

    def finish(self) -> None:
        self._on_received()
        if not self._gone:
            self._inner.finish()

    def on_connection_close(self) -> None:
        if not self._gone:
            self._inner.on_connection_close()


__all__ = ["MAX_CONNECTIONS", "MonitorHTTPServer"]
