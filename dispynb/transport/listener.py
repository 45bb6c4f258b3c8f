"""`Listener`: accepts TCP (or TLS) connections, authenticates them, hands them on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

from tornado.netutil import bind_sockets

from dispynb.defaults import HANDSHAKE_TIMEOUT
from dispynb.errors import ConnectionClosedError, DispynbError
from dispynb.protocol.messages import Welcome
from dispynb.transport.addressing import format_address
from dispynb.transport.connection import Connection, describe_error
from dispynb.transport.handshake import node_handshake

logger = logging.getLogger(__name__)

#: Connections allowed to be in their handshake at once; more are closed at accept.
MAX_PENDING_HANDSHAKES = 64

#: Connections accepted per wake-up of a listening socket.
_ACCEPT_BATCH = 16

Handler = Callable[[Connection, str], Awaitable[None]]


class Listener:
    """Accepts connections; runs the handshake; calls ``handler(conn, client_name)``.

    A failed or slow handshake (over ``handshake_timeout``) closes that connection only,
    with a warning; the handler's own errors are logged and close only its connection.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        secret: bytes | None,
        make_welcome: Callable[[], Welcome],
        max_message_size: int,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self._ssl_context = ssl_context
        self._handler = handler
        self._secret = secret
        self._make_welcome = make_welcome
        self._max_message_size = max_message_size
        self._handshake_timeout = handshake_timeout
        self._pending = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._sockets: list[socket.socket] = []
        self.port = 0

    def listen_on(self, host: str, port: int) -> int:
        """Bind and listen on ``host:port`` (0 picks a free port); return the port.

        Call it on the running loop, which then accepts the connections.
        """
        loop = asyncio.get_running_loop()
        sockets = bind_sockets(port, address=host)
        for sock in sockets:
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._accept, sock)
        self._sockets.extend(sockets)
        self.port = sockets[0].getsockname()[1]
        return self.port

    def stop(self) -> None:
        """Stop accepting connections (idempotent); accepted ones go on."""
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()

    def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # out of file descriptors...: try again later
                logger.warning("cannot accept a connection: %s", exc)
                return
            task = loop.create_task(self._serve(sock, address))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Handshake, then run the handler for one connection."""
        peer = format_address(str(address[0]), int(address[1]))
        if self._pending >= MAX_PENDING_HANDSHAKES:
            logger.warning(
                "too many pending handshakes; dropping connection from %s", peer
            )
            sock.close()
            return
        self._pending += 1
        conn: Connection | None = None
        try:
            async with asyncio.timeout(self._handshake_timeout):
                if self._ssl_context is None:
                    conn = Connection.over_socket(sock, peer)
                else:
                    conn = await Connection.over_tls(
                        sock, peer, self._ssl_context, server_side=True
                    )
                name = await node_handshake(
                    conn, self._secret, self._max_message_size, self._make_welcome
                )
        except TimeoutError:
            logger.warning("handshake with %s timed out; connection closed", peer)
            _abort(conn, sock)
            return
        except DispynbError as exc:
            logger.warning("rejected connection from %s: %s", peer, describe_error(exc))
            _abort(conn, sock)
            return
        except BaseException:
            _abort(conn, sock)
            raise
        finally:
            self._pending -= 1
        try:
            await self._handler(conn, name)
        except ConnectionClosedError:
            logger.debug("connection from %s closed", peer)
        except DispynbError as exc:
            logger.warning("connection from %s ended: %s", peer, describe_error(exc))
        except Exception:
            logger.exception("error serving %s", peer)
        finally:
            conn.close()


def _abort(conn: Connection | None, sock: socket.socket) -> None:
    if conn is not None:
        conn.abort()
    else:
        with contextlib.suppress(OSError):
            sock.close()
