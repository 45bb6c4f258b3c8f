"""UDP helpers for discovery, shared by clients and the node's announcer.

Interfaces and their addresses (IPv4 with broadcast addresses; routable IPv6), bound
non-blocking sockets, multicast group membership and sending, asyncio endpoints, and
which datagram senders are plausible nodes. Nothing here parses datagrams.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Interface:
    """An IPv4 address of this host, with its network's broadcast address if any.

    A loopback address has none (a datagram there stays on this machine), but
    ``local_broadcast``: its network's (127.255.255.255), which the kernel delivers
    to every socket of this network namespace listening on the port.
    """

    name: str
    address: str
    broadcast: str | None
    loopback: bool
    local_broadcast: str | None = None


def ipv4_interfaces() -> list[Interface]:
    """IPv4 addresses of this host (of its network namespace), loopback included."""
    import psutil  # lazily: ``import dispynb`` stays light

    out = []
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        for addr in addrs:
            if addr.family != socket.AF_INET:
                continue
            if not ipaddress.ip_address(addr.address).is_loopback:
                out.append(Interface(name, addr.address, addr.broadcast, False))
                continue
            network = ipaddress.IPv4Network(
                f"{addr.address}/{addr.netmask or 8}", strict=False
            )
            local = str(network.broadcast_address) if network.prefixlen < 31 else None
            out.append(Interface(name, addr.address, None, True, local))
    return out


def broadcast_addresses(host: str | None = None) -> list[str]:
    """Where a broadcast from ``host`` (None: from any address) goes: the broadcast
    address of each network ``host`` is on.

    When only loopback is up (an offline laptop, a container without a network),
    loopback's broadcast address instead: the nodes and clients on this machine are
    all there is to reach. Empty if the networks have no broadcast address
    (point-to-point links only).
    """
    interfaces = [i for i in ipv4_interfaces() if host is None or i.address == host]
    found = sorted({i.broadcast for i in interfaces if i.broadcast})
    if found or any(not i.loopback for i in interfaces):
        return found
    return sorted({i.local_broadcast for i in interfaces if i.local_broadcast})


@dataclasses.dataclass(frozen=True)
class Interface6:
    """A routable (not link-local, not loopback) IPv6 address of this host."""

    name: str
    address: str
    index: int


def ipv6_interfaces() -> list[Interface6]:
    """Routable IPv6 addresses of this host (of its network namespace)."""
    import psutil  # lazily: ``import dispynb`` stays light

    out = []
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        for addr in addrs:
            if addr.family != socket.AF_INET6:
                continue
            address = ipaddress.IPv6Address(addr.address.split("%")[0])
            if address.is_link_local or address.is_loopback:
                continue
            try:
                index = socket.if_nametoindex(name)
            except OSError:
                continue
            out.append(Interface6(name, str(address), index))
    return out


def udp6_socket(host: str, port: int, index: int = 0) -> socket.socket:
    """A non-blocking IPv6-only UDP socket bound to ``host:port`` (scope ``index``)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setblocking(False)
        sock.bind((host, port, 0, index))
    except BaseException:
        sock.close()
        raise
    return sock


def join_group6(sock: socket.socket, group: str, index: int) -> bool:
    """Join IPv6 multicast ``group`` on interface ``index``; log failures."""
    request = socket.inet_pton(socket.AF_INET6, group) + index.to_bytes(4, "little")
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, request)
    except OSError as exc:
        logger.warning("cannot join %s on interface %d: %s", group, index, exc)
        return False
    return True


def send6_from(address: str, index: int, data: bytes, target: tuple[str, int]) -> None:
    """Send one datagram from ``address`` (out of interface ``index``), then close.

    Multicast to a link-local group would otherwise leave from a link-local address,
    which a peer cannot connect back to without knowing the scope.
    """
    try:
        sock = udp6_socket(address, 0)
    except OSError as exc:
        logger.debug("cannot send from %s: %s", address, exc)
        return
    with sock:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
            sock.sendto(data, (target[0], target[1], 0, index))
        except OSError as exc:
            logger.debug("discovery datagram from %s not sent: %s", address, exc)


def is_wildcard_host(host: str) -> bool:
    """True for the addresses that mean "every interface"."""
    return host in ("", "0.0.0.0", "::", "*")


def udp_socket(host: str, port: int, *, broadcast: bool = False) -> socket.socket:
    """A non-blocking IPv4 UDP socket bound to ``host:port`` with SO_REUSEADDR."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if broadcast:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setblocking(False)
        sock.bind(("" if is_wildcard_host(host) else host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def join_group(sock: socket.socket, group: str, interface: str) -> bool:
    """Join multicast ``group`` on the interface holding ``interface``; log failures."""
    request = socket.inet_aton(group) + socket.inet_aton(interface)
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, request)
    except OSError as exc:
        logger.warning("cannot join %s on %s: %s", group, interface, exc)
        return False
    return True


def send_to_group(
    transport: asyncio.DatagramTransport,
    data: bytes,
    group: str,
    port: int,
    interfaces: Iterable[str],
) -> None:
    """Send ``data`` to a multicast group out of each of ``interfaces`` (addresses)."""
    sock = transport.get_extra_info("socket")
    for interface in interfaces:
        try:
            sock.setsockopt(
                socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface)
            )
        except OSError as exc:
            logger.debug("cannot send multicast out of %s: %s", interface, exc)
            continue
        transport.sendto(data, (group, port))


class DatagramEndpoint(asyncio.DatagramProtocol):
    """Hands every datagram to ``on_datagram(data, (ip, port))``; logs send errors
    and keeps the last one (`send_datagram` reads it)."""

    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        self._on_datagram = on_datagram
        self.last_error: Exception | None = None

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._on_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        self.last_error = exc
        logger.debug("discovery datagram not sent: %s", exc)


def send_datagram(
    transport: asyncio.DatagramTransport, data: bytes, address: tuple[Any, ...]
) -> str:
    """Send ``data`` to ``address``; ``""``, or why the socket refused it
    (``'Network is unreachable'``). asyncio hands that error to the endpoint's
    ``error_received``, not to the caller, while ``sendto`` runs."""
    endpoint = transport.get_protocol()
    if isinstance(endpoint, DatagramEndpoint):
        endpoint.last_error = None
    transport.sendto(data, address)
    error = endpoint.last_error if isinstance(endpoint, DatagramEndpoint) else None
    if error is None:
        return ""
    return (isinstance(error, OSError) and error.strerror) or str(error)


async def open_endpoint(
    sock: socket.socket, on_datagram: Callable[[bytes, tuple[str, int]], None]
) -> asyncio.DatagramTransport:
    """An asyncio transport over a bound UDP socket."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: DatagramEndpoint(on_datagram), sock=sock
    )
    return transport


def usable_source(ip: str) -> bool:
    """False for addresses no node sends from (unspecified, multicast, broadcast),
    and for link-local IPv6 ones (a connection would need their scope)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.is_link_local:
        return False
    return not (
        address.is_unspecified or address.is_multicast or ip == "255.255.255.255"
    )
