"""`Listener`: accepts TCP (or TLS) connections, authenticates them, hands them on."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable

from tornado.iostream import IOStream
from tornado.netutil import bind_sockets
from tornado.tcpserver import TCPServer

from dispynb.defaults import HANDSHAKE_TIMEOUT
from dispynb.errors import ConnectionClosedError, DispynbError
from dispynb.protocol.messages import Welcome
from dispynb.transport.addressing import format_address
from dispynb.transport.connection import (
    Connection,
    describe_error,
    stream_buffer_size,
)
from dispynb.transport.handshake import node_handshake

logger = logging.getLogger(__name__)

#: Connections allowed to be in their handshake at once; more are closed at accept.
MAX_PENDING_HANDSHAKES = 64

Handler = Callable[[Connection, str], Awaitable[None]]


class Listener(TCPServer):
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
        super().__init__(
            ssl_options=ssl_context,
            max_buffer_size=stream_buffer_size(max_message_size),
        )
        self._handler = handler
        self._secret = secret
        self._make_welcome = make_welcome
        self._max_message_size = max_message_size
        self._handshake_timeout = handshake_timeout
        self._pending = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    def listen_on(self, host: str, port: int) -> int:
        """Bind and listen on ``host:port`` (0 picks a free port); return the port."""
        sockets = bind_sockets(port, address=host)
        self.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        return self.port

    async def handle_stream(self, stream: IOStream, address: tuple[str, int]) -> None:
        """Handshake, then run the handler for one connection (tornado entry point)."""
        peer = format_address(str(address[0]), int(address[1]))
        if self._pending >= MAX_PENDING_HANDSHAKES:
            logger.warning(
                "too many pending handshakes; dropping connection from %s", peer
            )
            stream.close()
            return
        conn = Connection(stream, peer)
        self._pending += 1
        try:
            async with asyncio.timeout(self._handshake_timeout):
                name = await node_handshake(
                    conn, self._secret, self._max_message_size, self._make_welcome
                )
        except TimeoutError:
            logger.warning("handshake with %s timed out; connection closed", peer)
            conn.abort()
            return
        except DispynbError as exc:
            logger.warning("rejected connection from %s: %s", peer, describe_error(exc))
            conn.abort()
            return
        finally:
            self._pending -= 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
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
            if task is not None:
                self._tasks.discard(task)
