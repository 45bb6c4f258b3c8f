"""UDP discovery: `Discovery` finds node servers for a client; helpers nodes share.

A client sends `Ping` datagrams to broadcast addresses, to the IPv4 multicast group or
to named hosts, and listens for `Announce` datagrams: replies to its pings, and the
announcements nodes send when they start. It reports each node once, as the address
the datagram came from plus the announced TCP port: never an address from the payload,
so a datagram cannot make a client connect to a third party's address. The client then
connects over TCP and authenticates; discovery itself carries no secret.

IPv4 only. Sends and receives are bound to this process's own sockets; nothing here
opens a TCP connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Iterable

from dispynb.defaults import DISCOVERY_PORT, IPV4_MULTICAST_GROUP
from dispynb.errors import ConfigurationError
from dispynb.protocol.discovery import (
    Announce,
    DiscoveryError,
    Ping,
    decode,
    encode,
    new_nonce,
)
from dispynb.protocol.messages import PROTOCOL_VERSION
from dispynb.transport.addressing import parse_address

logger = logging.getLogger(__name__)

#: Target meaning "every local IPv4 network" (the broadcast address of each interface).
BROADCAST = "<broadcast>"

#: Nodes remembered at most (announcements from more addresses are ignored).
MAX_FOUND = 4096

#: ``on_found(ip, tcp_port, name, cpus)``
FoundCallback = Callable[[str, int, str, int], None]
#: ``on_lost(ip, tcp_port)``: the node said it is leaving.
LostCallback = Callable[[str, int], None]

_WILDCARD_24 = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.\*")


def broadcast_for(spec: str) -> str | None:
    """The broadcast target for a wildcard node spec, or None if it has none.

    ``'10.77.0.*'`` -> ``'10.77.0.255'``; ``'*'`` -> ``'<broadcast>'`` (every local
    network). Other patterns (``'10.*'``, host names, plain addresses) give None.
    """
    spec = spec.strip()
    if spec == "*":
        return BROADCAST
    match = _WILDCARD_24.fullmatch(spec)
    if match is None or any(int(part) > 255 for part in match.groups()):
        return None
    return ".".join(match.groups()) + ".255"


def discovery_targets(specs: Iterable[str], multicast: bool = False) -> list[str]:
    """Ping targets for wildcard node specs (dispy's ``nodes=['10.77.0.*']``).

    With ``multicast`` every wildcard is served by the multicast group; otherwise each
    spec by its broadcast address, and patterns without one by `BROADCAST`.
    """
    targets: list[str] = []
    for spec in specs:
        if "*" not in spec:
            continue
        target = IPV4_MULTICAST_GROUP if multicast else broadcast_for(spec) or BROADCAST
        if target not in targets:
            targets.append(target)
    return targets


# -- helpers shared with the node's announcer ----------------------------------------


@dataclasses.dataclass(frozen=True)
class Interface:
    """An IPv4 address of this host, with its network's broadcast address if any."""

    name: str
    address: str
    broadcast: str | None
    loopback: bool


def ipv4_interfaces() -> list[Interface]:
    """IPv4 addresses of this host (of its network namespace), loopback included."""
    import psutil  # lazily: ``import dispynb`` stays light

    out = []
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        for addr in addrs:
            if addr.family != socket.AF_INET:
                continue
            loopback = ipaddress.ip_address(addr.address).is_loopback
            broadcast = None if loopback else addr.broadcast
            out.append(Interface(name, addr.address, broadcast, loopback))
    return out


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
    """Hands every datagram to ``on_datagram(data, (ip, port))``; logs send errors."""

    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._on_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        logger.debug("discovery datagram not sent: %s", exc)


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
    """False for addresses no node sends from (unspecified, multicast, broadcast)."""
    try:
        address = ipaddress.IPv4Address(ip)
    except ValueError:
        return False
    return not (
        address.is_unspecified or address.is_multicast or ip == "255.255.255.255"
    )


# -- the client side -------------------------------------------------------------------


class Discovery:
    """Finds node servers with UDP pings and announcements (client side).

    Parameters
    ----------
    host:
        Local IPv4 address to send from (the client's interface); None: any, and
        broadcasts and multicasts go out of every non-loopback interface.
    port:
        Nodes' discovery port (UDP); pings go there.
    listen_port:
        UDP port to hear nodes' own announcements on; default ``port + 1``.
    listen:
        False: hear only replies to this client's pings.
    multicast:
        Also hear announcements sent to the IPv4 multicast group.

    Examples
    --------
    >>> discovery = Discovery()  # doctest: +SKIP
    >>> await discovery.start(["10.77.0.255"], on_found)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        host: str | None = None,
        port: int = DISCOVERY_PORT,
        listen_port: int | None = None,
        listen: bool = True,
        multicast: bool = False,
    ) -> None:
        if host is not None and not is_wildcard_host(host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ConfigurationError(
                    f"discovery needs an IPv4 address for host, not {host!r}"
                ) from None
        self.host = None if host is None or is_wildcard_host(host) else host
        self.port = port
        self.listen_port = port + 1 if listen_port is None else listen_port
        self.listen = listen
        self.multicast = multicast
        self.nonce = new_nonce()
        self._targets: list[tuple[str, int]] = []
        self._found: dict[tuple[str, int], bytes] = {}
        self._on_found: FoundCallback | None = None
        self._on_lost: LostCallback | None = None
        self._pinger: asyncio.DatagramTransport | None = None
        self._listener: asyncio.DatagramTransport | None = None
        self._full_warned = False
        self._version_warned: set[str] = set()

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """Where announcements are heard, if listening."""
        if self._listener is None:
            return None
        host, port = self._listener.get_extra_info("sockname")[:2]
        return str(host), int(port)

    @property
    def found(self) -> list[tuple[str, int]]:
        """``(ip, tcp_port)`` of the nodes found so far."""
        return list(self._found)

    async def start(
        self,
        targets: Iterable[str],
        on_found: FoundCallback,
        on_lost: LostCallback | None = None,
    ) -> None:
        """Open the sockets, ping ``targets`` and report nodes as they answer.

        ``targets``: IPv4 addresses, optionally ``addr:port`` (unicast hosts, directed
        broadcast addresses such as ``'10.77.0.255'``, the multicast group), or
        `BROADCAST` / ``'255.255.255.255'`` for every local network.
        """
        if self._pinger is not None:
            raise RuntimeError("discovery already started; use ping() for more targets")
        parsed = [self._parse_target(t) for t in targets]
        self._on_found, self._on_lost = on_found, on_lost
        sock = udp_socket(self.host or "", 0, broadcast=True)
        self._pinger = await open_endpoint(sock, self._received)
        if self.listen:
            await self._open_listener()
        self.ping(parsed)

    async def _open_listener(self) -> None:
        try:
            sock = udp_socket("", self.listen_port)
        except OSError as exc:
            logger.warning(
                "cannot listen for node announcements on UDP port %d (%s); nodes "
                "started later are found only by pings (ping_interval)",
                self.listen_port,
                exc,
            )
            return
        if self.multicast:
            for address in self._interfaces():
                join_group(sock, IPV4_MULTICAST_GROUP, address)
        self._listener = await open_endpoint(sock, self._received)

    def ping(self, targets: Iterable[str | tuple[str, int]]) -> None:
        """Ping more targets now (they are pinged again by `ping_again`)."""
        for target in targets:
            parsed = self._parse_target(target) if isinstance(target, str) else target
            if parsed not in self._targets:
                self._targets.append(parsed)
            self._send_ping(parsed)

    def ping_again(self) -> None:
        """Ping every target once more (dispy's ``ping_interval``)."""
        for target in self._targets:
            self._send_ping(target)

    def forget(self, ip: str, port: int) -> None:
        """Report the node at ``ip:port`` again when it next answers (after a loss)."""
        self._found.pop((ip, port), None)

    def close(self) -> None:
        """Close the sockets; idempotent."""
        for transport in (self._pinger, self._listener):
            if transport is not None:
                transport.close()
        self._pinger = self._listener = None

    # -- sending ---------------------------------------------------------------------

    def _parse_target(self, text: str) -> tuple[str, int]:
        text = text.strip()
        if text == BROADCAST:
            return BROADCAST, self.port
        host, port = parse_address(text, self.port)
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigurationError(
                f"discovery target {text!r} is not an IPv4 address: give an address "
                "('10.77.0.2'), a broadcast address ('10.77.0.255'), "
                f"{IPV4_MULTICAST_GROUP!r} or {BROADCAST!r}"
            ) from None
        if host == "255.255.255.255":
            return BROADCAST, port
        return host, port

    def _interfaces(self) -> list[str]:
        if self.host is not None:
            return [self.host]
        return [i.address for i in ipv4_interfaces() if not i.loopback]

    def _send_ping(self, target: tuple[str, int]) -> None:
        if self._pinger is None:
            return
        data = encode(Ping(nonce=self.nonce))
        host, port = target
        if host == BROADCAST:
            addresses = {
                i.broadcast
                for i in ipv4_interfaces()
                if i.broadcast and (self.host is None or i.address == self.host)
            }
            for address in sorted(addresses) or ["255.255.255.255"]:
                self._pinger.sendto(data, (address, port))
        elif ipaddress.IPv4Address(host).is_multicast:
            send_to_group(self._pinger, data, host, port, self._interfaces())
        else:
            self._pinger.sendto(data, (host, port))

    # -- receiving -------------------------------------------------------------------

    def _received(self, data: bytes, addr: tuple[str, int]) -> None:
        ip = addr[0]
        try:
            message = decode(data)
        except DiscoveryError as exc:
            logger.debug("ignored datagram from %s: %s", ip, exc)
            return
        if not isinstance(message, Announce) or not usable_source(ip):
            return
        if message.nonce and message.nonce != self.nonce:
            return  # a reply to someone else's ping
        key = (ip, message.port)
        if message.leaving:
            if self._found.pop(key, None) is not None and self._on_lost is not None:
                self._call(self._on_lost, ip, message.port)
            return
        if message.version != PROTOCOL_VERSION:
            if ip not in self._version_warned:
                self._version_warned.add(ip)
                logger.warning(
                    "node %r at %s speaks protocol %d, this client %d: not used",
                    message.name,
                    ip,
                    message.version,
                    PROTOCOL_VERSION,
                )
            return
        if self._found.get(key) == message.boot:
            return
        if key not in self._found and len(self._found) >= MAX_FOUND:
            if not self._full_warned:
                self._full_warned = True
                logger.warning("over %d nodes announced; ignoring more", MAX_FOUND)
            return
        self._found[key] = message.boot
        logger.debug("found node %r at %s:%d", message.name, ip, message.port)
        if self._on_found is not None:
            self._call(self._on_found, ip, message.port, message.name, message.cpus)

    @staticmethod
    def _call(callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:
            logger.exception("discovery callback %r failed", callback)
