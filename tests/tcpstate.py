"""What the kernel says of a test's own TCP connection: whether its peer reads no more.

A server that stops reading a client (back-pressure) is seen by the client as a
flush that does not end; a flush that took longer than a few seconds was taken for
that, and a server slow on a loaded machine passed for one that stopped. The kernel
knows: once the peer's receive buffer is full, it advertises a zero window and the
client's socket probes it (``/proc/net/tcp``'s timer 4, the zero window probe
timer). `flushed_or_held` waits for either end, the flush or that, not for a time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from dispynb.transport.connection import Connection

#: ``/proc/net/tcp``'s timer of a socket probing its peer's zero window.
_ZERO_WINDOW_PROBE = "04"


def peer_window_closed(local_port: int, peer_port: int) -> bool:
    """Whether the connection from ``local_port`` to ``peer_port`` (this network
    namespace's, any address) waits for its peer's zero window to open: the peer
    has not read what filled its receive buffer."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, timer = fields[1], fields[2], fields[5]
            if (
                int(local.rsplit(":", 1)[1], 16) == local_port
                and int(remote.rsplit(":", 1)[1], 16) == peer_port
            ):
                return timer.split(":")[0] == _ZERO_WINDOW_PROBE
    return False


async def flushed_or_held(conn: Connection, timeout: float) -> bool:
    """Wait until what was written to ``conn`` went to its peer (True), or the
    peer reads no more of it, its window closed (False); fail after ``timeout``
    seconds of neither."""
    local, peer = conn.local_address, conn.peer_address
    assert local is not None and peer is not None, conn
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    flush = asyncio.ensure_future(conn.flush())
    try:
        while not flush.done():
            if peer_window_closed(local[1], peer[1]):
                return False
            if loop.time() > deadline:
                raise AssertionError(
                    f"{conn}: neither flushed nor held by its peer in {timeout} s"
                )
            await asyncio.wait([flush], timeout=0.01)
        flush.result()
        return True
    finally:
        flush.cancel()
