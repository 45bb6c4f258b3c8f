"""`Announcer`: a node server's side of UDP discovery (on unless ``--no-discovery``).

It answers each `Ping` with an `Announce` sent back to the pinging socket (a reply to
a datagram; the node never connects anywhere), and announces the node to clients'
discovery port when it starts and when it stops. Replies are rate-limited, so the node
cannot be used to flood a third party with spoofed pings.

Sockets (IPv4): with a wildcard ``host`` one socket on every address; with a specific
host, a socket on that address (replies and announcements leave from it, so clients see
the address the node's TCP server listens on) plus receive-only sockets on its
network's broadcast address, on 255.255.255.255 and, with ``multicast``, on the
multicast group.

IPv6 (``host`` is ``'::'`` or an IPv6 address): one socket on ``host`` that joins the
IPv6 discovery group on every interface with a routable IPv6 address (a specific host:
plus a receive-only socket on the group, since a socket bound to a unicast address
hears no multicast). Replies leave from ``host`` (or, for ``'::'``, from the address
the kernel picks for the client's), and announcements from each routable address, so
clients never see a link-local sender.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time

from dispynb.defaults import DISCOVERY_PORT, IPV4_MULTICAST_GROUP
from dispynb.errors import ConfigurationError
from dispynb.protocol.discovery import (
    Announce,
    DiscoveryError,
    Ping,
    decode,
    encode,
    fit_name,
    new_boot_id,
)
from dispynb.transport.addressing import parse_address
from dispynb.transport.discovery import IPV6_MULTICAST_GROUP
from dispynb.transport.sourcelog import SourceWarnings
from dispynb.transport.udp import (
    Interface6,
    broadcast_addresses,
    ipv4_interfaces,
    ipv6_interfaces,
    is_wildcard_host,
    join_group,
    join_group6,
    open_endpoint,
    send6_from,
    send_to_group,
    udp6_socket,
    udp_socket,
    usable_source,
)

logger = logging.getLogger(__name__)

#: Replies per second to one address, and in all.
REPLIES_PER_SOURCE = 20
REPLIES_PER_SECOND = 200

#: Sources whose pings over `REPLIES_PER_SOURCE` are each logged (once); past them
#: one line says more come (anyone can ping, from any source address, each second).
PING_WARNINGS = 16


class Announcer:
    """Answers discovery pings and announces a node server.

    Parameters
    ----------
    name, tcp_port, cpus:
        What is announced: the node's name, its TCP port, its CPUs.
    host:
        The node's listening address: an IPv4 wildcard (``''``, ``'0.0.0.0'``), one
        IPv4 address, ``'::'`` or one IPv6 address (IPv6 discovery).
    port:
        UDP port to hear pings on (0: any free port, for tests).
    client_port:
        UDP port of clients' announcement listeners; default ``port + 1``.
    multicast:
        Also hear pings sent to the IPv4 multicast group, and announce there.
    announce_to:
        ``addr[:port]`` targets of the start and stop announcements; default: the
        broadcast address of the node's network(s) (loopback's if only loopback
        is up; and the group with ``multicast``), none for a loopback host.
    ext:
        An IP address announced for clients to connect to instead of the sender's
        (``--ext-host``), or ``''``.
    """

    def __init__(
        self,
        *,
        name: str,
        tcp_port: int,
        cpus: int,
        host: str = "",
        port: int = DISCOVERY_PORT,
        client_port: int | None = None,
        multicast: bool = False,
        announce_to: list[str] | None = None,
        ext: str = "",
    ) -> None:
        self.ipv6 = ":" in host
        self.host = "" if is_wildcard_host(host) else host
        if self.host:
            try:
                self.host = str(ipaddress.ip_address(self.host.strip("[]")))
            except ValueError:
                raise ConfigurationError(
                    f"discovery needs an IP address, 0.0.0.0 or :: as the node's host, "
                    f"not {host!r}"
                ) from None
        self.name = fit_name(name)
        self.tcp_port = tcp_port
        self.cpus = max(1, min(cpus, 0xFFFF))
        self.port = port
        self._client_port = client_port
        self.multicast = multicast
        self.boot = new_boot_id()
        self._announce_to = announce_to
        self.ext = ext
        self._main: asyncio.DatagramTransport | None = None
        self._others: list[asyncio.DatagramTransport] = []
        self._window = 0
        self._counts: dict[str, int] = {}
        self._total = 0
        self._ping_warnings = SourceWarnings(
            PING_WARNINGS,
            logger,
            logging.INFO,
            "discovery: more than %d sources ping too often; ignoring some of their "
            "pings, no longer logged",
        )

    @property
    def client_port(self) -> int:
        """Clients' announcement port."""
        return self.port + 1 if self._client_port is None else self._client_port

    async def start(self) -> int:
        """Open the sockets and announce the node; return the bound UDP port."""
        if self.ipv6:
            return await self._start6()
        sock = udp_socket(self.host, self.port, broadcast=True)
        try:
            self.port = sock.getsockname()[1]
            self._main = await open_endpoint(sock, self._received)
        except BaseException:
            sock.close()
            raise
        try:
            await self._open_others()
        except BaseException:
            self.close(leaving=False)
            raise
        interfaces = self._interfaces()
        if self.multicast:
            if self.host:
                raw = self._main.get_extra_info("socket")
                raw.setsockopt(
                    socket.IPPROTO_IP,
                    socket.IP_MULTICAST_IF,
                    socket.inet_aton(self.host),
                )
            else:
                for address in interfaces:
                    join_group(sock, IPV4_MULTICAST_GROUP, address)
        logger.info(
            "discovery: answering pings on UDP %s:%d%s",
            self.host or "*",
            self.port,
            f" and multicast group {IPV4_MULTICAST_GROUP}" if self.multicast else "",
        )
        self.announce()
        return self.port

    async def _open_others(self) -> None:
        if not self.host or ipaddress.IPv4Address(self.host).is_loopback:
            return
        addresses = [
            i.broadcast
            for i in ipv4_interfaces()
            if i.address == self.host and i.broadcast
        ]
        addresses.append("255.255.255.255")
        for address in addresses:
            self._others.append(
                await open_endpoint(udp_socket(address, self.port), self._received)
            )
        if self.multicast:
            sock = udp_socket(IPV4_MULTICAST_GROUP, self.port)
            join_group(sock, IPV4_MULTICAST_GROUP, self.host)
            self._others.append(await open_endpoint(sock, self._received))

    def _interfaces(self) -> list[str]:
        if self.host:
            return [self.host]
        return [i.address for i in ipv4_interfaces() if not i.loopback]

    def _interfaces6(self) -> list[Interface6]:
        return [i for i in ipv6_interfaces() if self.host in ("", i.address)]

    async def _start6(self) -> int:
        interfaces = self._interfaces6()
        sock = udp6_socket(self.host or "::", self.port)
        try:
            self.port = sock.getsockname()[1]
            if not self.host:
                for index in sorted({i.index for i in interfaces}):
                    join_group6(sock, IPV6_MULTICAST_GROUP, index)
            self._main = await open_endpoint(sock, self._received)
        except BaseException:
            sock.close()
            raise
        try:
            if self.host:
                for index in sorted({i.index for i in interfaces}):
                    group = udp6_socket(IPV6_MULTICAST_GROUP, self.port, index)
                    join_group6(group, IPV6_MULTICAST_GROUP, index)
                    self._others.append(await open_endpoint(group, self._received))
        except BaseException:
            self.close(leaving=False)
            raise
        if not interfaces:
            logger.warning(
                "IPv6 discovery: no routable IPv6 address%s: clients cannot find this "
                "node by multicast",
                f" is {self.host}" if self.host else " here",
            )
        logger.info(
            "discovery: answering pings on UDP [%s]:%d and group %s",
            self.host or "::",
            self.port,
            IPV6_MULTICAST_GROUP,
        )
        self.announce()
        return self.port

    def announce(self, *, leaving: bool = False) -> None:
        """Send an announcement to clients (see ``announce_to``)."""
        if self._main is None:
            return
        data = encode(self._message(leaving=leaving))
        if self._announce_to is not None:
            for target in self._announce_to:
                self._main.sendto(data, parse_address(target, self.client_port))
            return
        if self.ipv6:
            for interface in self._interfaces6():
                send6_from(
                    interface.address,
                    interface.index,
                    data,
                    (IPV6_MULTICAST_GROUP, self.client_port),
                )
            return
        if self.host and ipaddress.IPv4Address(self.host).is_loopback:
            return
        for address in broadcast_addresses(self.host or None):
            self._main.sendto(data, (address, self.client_port))
        if self.multicast:
            if self.host:
                self._main.sendto(data, (IPV4_MULTICAST_GROUP, self.client_port))
            else:
                send_to_group(
                    self._main,
                    data,
                    IPV4_MULTICAST_GROUP,
                    self.client_port,
                    self._interfaces(),
                )

    def close(self, *, leaving: bool = True) -> None:
        """Close the sockets, first announcing that the node leaves; idempotent."""
        if leaving:
            self.announce(leaving=True)
        for transport in [self._main, *self._others]:
            if transport is not None:
                transport.close()
        self._main, self._others = None, []

    def _message(self, *, nonce: bytes = b"", leaving: bool = False) -> Announce:
        return Announce(
            name=self.name,
            port=self.tcp_port,
            cpus=self.cpus,
            boot=self.boot,
            nonce=nonce,
            leaving=leaving,
            ext=self.ext,
        )

    def _received(self, data: bytes, addr: tuple[str, int]) -> None:
        ip, port = addr
        try:
            message = decode(data)
        except DiscoveryError as exc:
            logger.debug("ignored datagram from %s: %s", ip, exc)
            return
        if not isinstance(message, Ping) or not usable_source(ip) or port == 0:
            return
        if not self._allow(ip):
            return
        if self._main is not None:
            self._main.sendto(encode(self._message(nonce=message.nonce)), addr)

    def _allow(self, ip: str) -> bool:
        window = int(time.monotonic())
        if window != self._window:
            self._window, self._counts, self._total = window, {}, 0
        count = self._counts.get(ip, 0)
        if count >= REPLIES_PER_SOURCE or self._total >= REPLIES_PER_SECOND:
            if count == REPLIES_PER_SOURCE:
                self._counts[ip] = count + 1
                self._too_many(ip)
            return False
        self._counts[ip] = count + 1
        self._total += 1
        return True

    def _too_many(self, ip: str) -> None:
        """Log that ``ip`` pings too often: once per source, for `PING_WARNINGS`
        sources, then one line (was: a line per source each second, without end)."""
        if self._ping_warnings.first(ip):
            logger.info("discovery: too many pings from %s; ignoring some", ip)
