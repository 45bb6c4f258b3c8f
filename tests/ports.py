"""Ports of 127.0.0.1 for tests that must name a port before anything listens there.

Binding port 0, closing the socket and using its number races with every test
running beside: any of them may be given that port meanwhile. `held_ports` keeps
each port it hands out bound, by a socket that does not listen: no port-0 bind gets
it while it is held, and a connection to it is refused, as where nothing runs. The
servers a test starts there later bind it all the same: dispynb's node and scheduler
(`dispynb.transport.addressing.bind_listening`) and tornado's (Jupyter's) set
``SO_REUSEADDR``, as the holder does, and Linux lets such a socket share its port
with bound sockets that do not listen. A server that binds without it (Ray's) has
to be given a fresh port and started again if another took it.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


class PortHolder:
    """Hands out held ports (call it); `close` lets them all go."""

    def __init__(self) -> None:
        self._sockets: list[socket.socket] = []

    def __call__(self) -> int:
        """A port of 127.0.0.1 held until `close`: nothing listens there yet."""
        sock = socket.socket()
        self._sockets.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()


@contextlib.contextmanager
def held_ports() -> Iterator[PortHolder]:
    """A `PortHolder` whose ports are let go at the end of the block."""
    holder = PortHolder()
    try:
        yield holder
    finally:
        holder.close()
