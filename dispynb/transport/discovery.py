"""UDP discovery: `Discovery` finds node servers for a client (helpers: `udp`).

A client sends `Ping` datagrams to broadcast addresses, to the IPv4 multicast group or
to named hosts, and listens for `Announce` datagrams: replies to its pings, and the
announcements nodes send when they start. It reports each node once, as the address
the datagram came from plus the announced TCP port: never an address from the payload,
so a datagram cannot make a client connect to a third party's address. The client then
connects over TCP and authenticates; discovery itself carries no secret.

IPv6: wildcard specs such as ``'fd00:77::*'`` (or the target `IPV6_MULTICAST_GROUP`)
ping the link-local group `IPV6_MULTICAST_GROUP` on every interface that has a routable
(non-link-local) IPv6 address, *from* that address, so that nodes answer from theirs
and the client can connect to the sender without a scope id. Link-local senders are
ignored. Sends and receives are bound to this process's own sockets; nothing here
opens a TCP connection.
"""

from __future__ import annotations

import asyncio
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
from dispynb.transport.sourcelog import SourceWarnings
from dispynb.transport.udp import (
    broadcast_addresses,
    ipv4_interfaces,
    ipv6_interfaces,
    is_wildcard_host,
    join_group,
    join_group6,
    open_endpoint,
    send_datagram,
    send_to_group,
    udp6_socket,
    udp_socket,
    usable_source,
)

__all__ = [
    "BROADCAST",
    "IPV6_MULTICAST_GROUP",
    "Discovery",
    "broadcast_for",
    "discovery_targets",
]

logger = logging.getLogger(__name__)

#: Target meaning "every local IPv4 network" (the broadcast address of each interface).
BROADCAST = "<broadcast>"

#: IPv6 discovery group: dispy's group id (``ff05::b409:...``) with link-local scope,
#: which every IPv6 link carries without multicast routing.
IPV6_MULTICAST_GROUP = "ff02::b409:3171:9705:5134:6159"

#: Nodes remembered at most (announcements from more addresses are ignored).
MAX_FOUND = 4096

#: Addresses whose announcements of another protocol version are each logged; past
#: them one line says more come (anyone can send one, from any source address).
VERSION_WARNINGS = 16

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
        if ":" in spec:  # an IPv6 pattern: IPv6 has no broadcast
            target = IPV6_MULTICAST_GROUP
        elif multicast:
            target = IPV4_MULTICAST_GROUP
        else:
            target = broadcast_for(spec) or BROADCAST
        if target not in targets:
            targets.append(target)
    return targets


# -- the client side -------------------------------------------------------------------


class Discovery:
    """Finds node servers with UDP pings and announcements (client side).

    Parameters
    ----------
    host:
        Local address to send from (the client's interface); None: any, and
        broadcasts and multicasts go out of every non-loopback interface (when
        only loopback is up, broadcasts go to loopback's: this machine's nodes). An IPv4
        address applies to IPv4 pings, an IPv6 one to IPv6 pings.
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
        self.host: str | None = None
        self.host6: str | None = None
        if host is not None and not is_wildcard_host(host):
            try:
                address = ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                raise ConfigurationError(
                    f"discovery needs an IP address for host, not {host!r}"
                ) from None
            if address.version == 4:
                self.host = str(address)
            else:
                self.host6 = str(address)
        self.port = port
        self.listen_port = port + 1 if listen_port is None else listen_port
        self.listen = listen
        self.multicast = multicast
        self.nonce = new_nonce()
        self._targets: list[tuple[str, int]] = []
        self._found: dict[tuple[str, int], bytes] = {}
        self._ext: dict[tuple[str, int], str] = {}
        self._unsent: dict[str, str] = {}
        self._on_found: FoundCallback | None = None
        self._on_lost: LostCallback | None = None
        self._pinger: asyncio.DatagramTransport | None = None
        self._listener: asyncio.DatagramTransport | None = None
        # IPv6: one pinger per routable address (with its interface), one listener.
        self._pingers6: list[tuple[asyncio.DatagramTransport, int]] = []
        self._listener6: asyncio.DatagramTransport | None = None
        self._opening6: asyncio.Task[None] | None = None
        self._full_warned = False
        self._version_warnings = SourceWarnings(
            VERSION_WARNINGS,
            logger,
            logging.WARNING,
            "more than %d addresses announce nodes of another protocol version: not "
            "used, no longer logged",
        )

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """Where announcements are heard, if listening."""
        if self._listener is None:
            return None
        host, port = self._listener.get_extra_info("sockname")[:2]
        return str(host), int(port)

    @property
    def unsent(self) -> dict[str, str]:
        """The addresses whose latest ping could not be sent, each with why
        (``{'10.1.0.255': 'Network is unreachable'}``): no node there heard it."""
        return dict(self._unsent)

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
        if any(":" in host for host, _ in parsed):
            await self._open_ipv6()
        self.ping(parsed)

    async def _open_ipv6(self) -> None:
        """Open the IPv6 pingers (and listener); without a routable IPv6 address,
        IPv6 targets get nothing."""
        if self._pingers6:
            return
        interfaces = [i for i in ipv6_interfaces() if self.host6 in (None, i.address)]
        if not interfaces:
            logger.warning(
                "IPv6 discovery: no routable IPv6 address here%s; nothing pinged",
                f" matching {self.host6}" if self.host6 else "",
            )
        for interface in interfaces:
            sock = udp6_socket(interface.address, 0)
            sock.setsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, interface.index
            )
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
            transport = await open_endpoint(sock, self._received)
            self._pingers6.append((transport, interface.index))
        if self.listen and interfaces:
            try:
                sock = udp6_socket("::", self.listen_port)
            except OSError as exc:
                logger.warning(
                    "cannot listen for IPv6 node announcements on UDP port %d (%s)",
                    self.listen_port,
                    exc,
                )
                return
            for index in sorted({i.index for i in interfaces}):
                join_group6(sock, IPV6_MULTICAST_GROUP, index)
            self._listener6 = await open_endpoint(sock, self._received)

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
            if ":" in parsed[0] and not self._pingers6 and self._pinger is not None:
                self._open_ipv6_then_ping(parsed)
                continue
            self._send_ping(parsed)

    def _open_ipv6_then_ping(self, target: tuple[str, int]) -> None:
        async def open_then_ping() -> None:
            if self._opening6 is not None:
                await self._opening6
            await self._open_ipv6()
            self._send_ping(target)

        task = asyncio.get_running_loop().create_task(open_then_ping())
        self._opening6 = task

    def ping_again(self) -> None:
        """Ping every target once more (dispy's ``ping_interval``)."""
        for target in self._targets:
            self._send_ping(target)

    def forget(self, ip: str, port: int) -> None:
        """Report the node at ``ip:port`` again when it next answers (after a loss)."""
        self._found.pop((ip, port), None)
        self._ext.pop((ip, port), None)

    def ext_address(self, ip: str, port: int) -> str:
        """The address the node found at ``ip:port`` claims to be reachable at
        (``dispynb-node --ext-host``), or ``''``. A claim: see
        `dispynb.backends.finder`."""
        return self._ext.get((ip, port), "")

    def close(self) -> None:
        """Close the sockets; idempotent."""
        if self._opening6 is not None:
            self._opening6.cancel()
        pingers6 = [transport for transport, _ in self._pingers6]
        for transport in (self._pinger, self._listener, self._listener6, *pingers6):
            if transport is not None:
                transport.close()
        self._pinger = self._listener = self._listener6 = None
        self._pingers6 = []

    # -- sending ---------------------------------------------------------------------

    def _parse_target(self, text: str) -> tuple[str, int]:
        text = text.strip()
        if text == BROADCAST:
            return BROADCAST, self.port
        host, port = parse_address(text, self.port)
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise ConfigurationError(
                f"discovery target {text!r} is not an IP address: give an address "
                "('10.77.0.2', 'fd00::2'), a broadcast address ('10.77.0.255'), "
                f"{IPV4_MULTICAST_GROUP!r}, {IPV6_MULTICAST_GROUP!r} or {BROADCAST!r}"
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
        if ":" in host:
            if ipaddress.IPv6Address(host).is_multicast:
                for transport, index in self._pingers6:
                    self._send(transport, data, (host, port, 0, index))
            elif self._pingers6:
                self._send(self._pingers6[0][0], data, (host, port))
            return
        if host == BROADCAST:
            for address in broadcast_addresses(self.host) or ["255.255.255.255"]:
                self._send(self._pinger, data, (address, port))
        elif ipaddress.IPv4Address(host).is_multicast:
            send_to_group(self._pinger, data, host, port, self._interfaces())
        else:
            self._send(self._pinger, data, (host, port))

    def _send(
        self,
        transport: asyncio.DatagramTransport,
        data: bytes,
        address: tuple[str, int] | tuple[str, int, int, int],
    ) -> None:
        """Send a ping, keeping in `unsent` whether (and why) it could not go."""
        why = send_datagram(transport, data, address)
        if why:
            self._unsent[address[0]] = why
        else:
            self._unsent.pop(address[0], None)

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
            self._ext.pop(key, None)
            if self._found.pop(key, None) is not None and self._on_lost is not None:
                self._call(self._on_lost, ip, message.port)
            return
        if message.version != PROTOCOL_VERSION:
            if not self._version_warnings.first(ip):
                return
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
        if message.ext:
            self._ext[key] = message.ext
        else:
            self._ext.pop(key, None)
        logger.debug("found node %r at %s:%d", message.name, ip, message.port)
        if self._on_found is not None:
            self._call(self._on_found, ip, message.port, message.name, message.cpus)

    @staticmethod
    def _call(callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:
            logger.exception("discovery callback %r failed", callback)
