"""Which local user a connection comes from: for a node without a secret, which
serves only the user it runs as.

A Unix socket says (``SO_PEERCRED``). A TCP connection from this machine is found in
``/proc/net/tcp`` (or ``tcp6``): the peer's socket is the one whose local address is
the connection's peer address and whose remote address is ours, and its line names
its owner's uid (as identd does). Linux only; elsewhere the user is unknown.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys

__all__ = ["peer_uid"]

#: The tables of this network namespace's TCP sockets.
_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")

_Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process owning the other end of ``sock`` (a connection
    accepted on this machine), or None if it cannot be told (gone, another
    machine's, no /proc)."""
    if sock.family == socket.AF_UNIX:
        try:
            creds = sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
        except (OSError, AttributeError):  # no SO_PEERCRED here
            return None
        uid: int = struct.unpack("3i", creds)[1]
        return uid
    try:
        peer = _address(sock.getpeername())
        ours = _address(sock.getsockname())
    except (OSError, ValueError):
        return None
    for table in _TABLES:
        try:
            with open(table, encoding="ascii") as handle:
                next(handle, None)  # the header
                for line in handle:
                    fields = line.split()
                    if len(fields) < 8:
                        continue
                    if _parse(fields[1]) == peer and _parse(fields[2]) == ours:
                        return int(fields[7])
        except (OSError, ValueError):
            continue
    return None


def _address(name: tuple[object, ...]) -> _Address:
    """A socket address as an IP address (IPv4-mapped IPv6 as IPv4) and port."""
    ip = ipaddress.ip_address(str(name[0]).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, int(str(name[1]))


def _parse(text: str) -> _Address:
    """An address of /proc/net/tcp: the IP as 32-bit words, each printed in hex as
    the number the kernel reads from its bytes in host order; a colon; the port."""
    hex_ip, _, hex_port = text.partition(":")
    raw = b"".join(
        int(hex_ip[i : i + 8], 16).to_bytes(4, sys.byteorder)
        for i in range(0, len(hex_ip), 8)
    )
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, int(hex_port, 16)
