"""Unix-domain sockets for nodes this process started (issue 17, W2).

A round trip over loopback TCP runs the whole TCP stack twice per message; a Unix
socket between the same two processes costs some 15-20 us less per round trip. A
`LocalCluster` starts its nodes itself, so it knows they are on this host: each
node listens on a socket in the cluster's private (0700) directory besides its TCP
port, and the cluster records it here under the node's ``host:port``. `connect`
then opens that socket for ``host:port`` (no TLS) and runs the same authenticated
handshake over it; if the socket cannot be opened it connects over TCP as before.
Nothing is announced: only the process that made the directory knows the path.
"""

from __future__ import annotations

import contextlib
import os
import socket

__all__ = [
    "MAX_PATH",
    "UNIX_PEER",
    "bind_unix",
    "open_unix",
    "path_for",
    "register",
    "unregister",
    "usable",
]

#: Longest socket path used (``sun_path`` holds 108 bytes on Linux, 104 elsewhere).
MAX_PATH = 100

#: The source a connection over a Unix socket counts under at a node.
UNIX_PEER = "unix-socket"

#: ``(host, port)`` -> the Unix socket of the node listening there.
_paths: dict[tuple[str, int], str] = {}


def usable(path: str) -> bool:
    """Whether ``path`` fits in a socket address (and Unix sockets exist here)."""
    return hasattr(socket, "AF_UNIX") and len(os.fsencode(path)) <= MAX_PATH


def register(host: str, port: int, path: str) -> None:
    """Connect to the node at ``host:port`` through the Unix socket ``path``."""
    _paths[(host, port)] = path


def unregister(host: str, port: int) -> None:
    """Forget ``host:port``'s socket (its node stopped)."""
    _paths.pop((host, port), None)


def path_for(host: str, port: int) -> str | None:
    """The Unix socket registered for ``host:port``, if any."""
    return _paths.get((host, port)) if _paths else None


async def open_unix(path: str) -> socket.socket:
    """A non-blocking socket connected to the Unix socket ``path`` (OSError if
    nothing listens there)."""
    import asyncio  # here: LocalCluster imports this module, `import dispynb` is light

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_unix(path: str, backlog: int) -> socket.socket:
    """A listening, non-blocking Unix socket at ``path`` (mode 0600), replacing a
    socket left there by an earlier listen of this node (its directory is private)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.setblocking(False)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
