"""Large buffers between a Dask worker's task thread and a job's runner process.

Both ends talk over one Unix socket pair with `multiprocessing.connection.Connection`
messages (small pickles: the job's header, the outcome). The job's argument buffers
and its result's buffers follow their message raw, their sizes given in it: the
sender writes each straight from its memory (``sendall``) and the receiver reads
each into a new ``bytes`` object of that size with one ``recv(MSG_WAITALL)``.
``Connection.recv_bytes`` instead gathers a large message chunk by chunk and copies
it twice more (several times the CPU of the copy out of the socket for 10 MB).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from dispynb.protocol.framing import Buffer


def send_buffers(sock: socket.socket, buffers: Sequence[Buffer]) -> None:
    """Write ``buffers`` one after the other, without a copy."""
    for buffer in buffers:
        sock.sendall(buffer)


def recv_buffers(sock: socket.socket, sizes: Sequence[int]) -> list[bytes]:
    """Read one ``bytes`` per size in ``sizes``; `EOFError` if the peer left."""
    return [recv_exact(sock, size) for size in sizes]


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes into one ``bytes`` object (`EOFError` at EOF)."""
    if size == 0:
        return b""
    data = sock.recv(size, socket.MSG_WAITALL)
    if len(data) == size:
        return data
    parts = bytearray(data)  # a signal cut the read short, or the peer left
    while len(parts) < size:
        more = sock.recv(size - len(parts), socket.MSG_WAITALL)
        if not more:
            raise EOFError(f"the peer closed after {len(parts)} of {size} bytes")
        parts += more
    return bytes(parts)
