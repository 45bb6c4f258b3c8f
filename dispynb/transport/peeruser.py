"""Which local user a connection comes from: for a node without a secret, which
serves only the user it runs as.

A Unix socket says (``SO_PEERCRED``). A TCP connection from this machine: the peer's
socket is the one whose local address is the connection's peer address and whose
remote address is ours; the kernel looks it up by that 4-tuple for a sock_diag
netlink request (what ``ss`` uses; one lookup, whatever the number of sockets), whose
answer names its owner's uid; where netlink is not allowed, the socket is looked for
in ``/proc/net/tcp`` (as identd does). Linux only; elsewhere the user is unknown.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import sys

__all__ = ["peer_uid"]

#: The tables of this network namespace's TCP sockets.
_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")

# sock_diag (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h).
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NO_COOKIE = 0xFFFFFFFF
#: nlmsghdr; inet_diag_req_v2 (family, protocol, ext, pad, states, then the
#: inet_diag_sockid: ports and addresses big-endian, interface, cookie).
_HEADER = struct.Struct("=IHHII")
#: Offset of idiag_uid in inet_diag_msg, after the nlmsghdr.
_UID_AT = _HEADER.size + 64

_Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


#: This process (or the system) has no descriptor left to ask with: not "cannot be
#: told", only "not now".
_NO_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process owning the other end of ``sock`` (a connection
    on this machine), or None if it cannot be told (gone, another machine's, no
    /proc). Raises OSError (EMFILE, ENFILE) when no descriptor is left to ask
    with: the caller may ask again later."""
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
    try:
        return _diag_uid(peer, ours)
    except OSError as exc:
        if exc.errno in _NO_DESCRIPTORS:
            raise
        return _table_uid(peer, ours)


def _table_uid(peer: _Address, ours: _Address) -> int | None:
    """`peer_uid` from /proc/net/tcp{,6}: a line per socket."""
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
        except OSError as exc:
            if exc.errno in _NO_DESCRIPTORS:
                raise
            continue
        except ValueError:
            continue
    return None


def _diag_uid(peer: _Address, ours: _Address) -> int | None:
    """`peer_uid` by a sock_diag request for the peer's socket (OSError: netlink
    refused)."""
    (peer_ip, peer_port), (our_ip, our_port) = peer, ours
    family = socket.AF_INET if peer_ip.version == 4 else socket.AF_INET6
    body = _request(family, peer_ip.packed, peer_port, our_ip.packed, our_port)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(_HEADER.pack(_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY,
                               _NLM_F_REQUEST, 1, 0) + body, (0, 0))  # fmt: skip
        answer = nl.recv(65536)
    if len(answer) < _HEADER.size:
        return None
    _length, kind, _flags, _seq, _pid = _HEADER.unpack_from(answer)
    if kind != _SOCK_DIAG_BY_FAMILY or len(answer) < _UID_AT + 4:
        return None  # NLMSG_ERROR: no such socket (gone, or not of this machine)
    uid: int = struct.unpack_from("=I", answer, _UID_AT)[0]
    return uid


def _request(family: int, src: bytes, sport: int, dst: bytes, dport: int) -> bytes:
    """An inet_diag_req_v2 for the TCP socket ``src:sport -> dst:dport``."""
    return (
        struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
        + struct.pack(">HH", sport, dport)
        + src.ljust(16, b"\0")
        + dst.ljust(16, b"\0")
        + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE)
    )


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
