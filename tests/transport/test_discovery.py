"""UDP discovery on 127.0.0.1 only: unicast pings, replies, announcements.

Nothing here broadcasts or multicasts (that runs in the namespace hosts of
``tests/multihost``); every socket is bound to a loopback address.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from dispynb.defaults import IPV4_MULTICAST_GROUP
from dispynb.errors import ConfigurationError
from dispynb.protocol import discovery as d
from dispynb.transport import discovery as discovery_module
from dispynb.transport.discovery import (
    BROADCAST,
    IPV6_MULTICAST_GROUP,
    Discovery,
    broadcast_for,
    discovery_targets,
)
from dispynb.transport.udp import open_endpoint, udp_socket, usable_source
from nodeserver import announce as announce_module
from nodeserver.announce import REPLIES_PER_SOURCE, Announcer
from nodeserver.config import NodeConfig
from nodeserver.server import NodeServer
from tests.asyncutil import run
from tests.nodeproc import running_node
from tests.transport.util import wait_until

HOST = "127.0.0.1"


class Found:
    """Records ``on_found`` and ``on_lost`` calls."""

    def __init__(self) -> None:
        self.found: list[tuple[str, int, str, int]] = []
        self.lost: list[tuple[str, int]] = []

    def on_found(self, ip: str, port: int, name: str, cpus: int) -> None:
        self.found.append((ip, port, name, cpus))

    def on_lost(self, ip: str, port: int) -> None:
        self.lost.append((ip, port))


class Peer:
    """A raw UDP socket on a loopback address that records what it receives."""

    def __init__(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport
        self.received: list[tuple[bytes, tuple[str, int]]] = []

    @classmethod
    async def open(cls, host: str = HOST) -> Peer:
        peer = cls.__new__(cls)
        peer.received = []
        peer.transport = await open_endpoint(
            udp_socket(host, 0), lambda data, addr: peer.received.append((data, addr))
        )
        return peer

    def send(self, data: bytes, port: int, host: str = HOST) -> None:
        self.transport.sendto(data, (host, port))

    def close(self) -> None:
        self.transport.close()


def announce(**changes: object) -> bytes:
    fields: dict[str, object] = {
        "name": "forger",
        "port": 4242,
        "cpus": 2,
        "boot": b"B" * d.BOOT_SIZE,
    }
    fields.update(changes)
    return d.encode(d.Announce(**fields))  # type: ignore[arg-type]


@pytest.fixture
def found() -> Found:
    return Found()


@pytest.fixture
def no_broadcast(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Fail the test if anything sends a datagram to a non-loopback address."""
    sent: list[tuple[str, int]] = []
    real_open = discovery_module.open_endpoint

    async def guarded_open(
        sock: socket.socket, on_datagram: Callable[[bytes, tuple[str, int]], None]
    ) -> asyncio.DatagramTransport:
        transport = await real_open(sock, on_datagram)
        real_sendto = transport.sendto

        def sendto(data: bytes, addr: Any = None) -> None:
            sent.append(addr)
            assert str(addr[0]).startswith("127."), f"datagram to {addr}"
            real_sendto(data, addr)

        transport.sendto = sendto  # type: ignore[method-assign]
        return transport

    monkeypatch.setattr(discovery_module, "open_endpoint", guarded_open)
    monkeypatch.setattr(announce_module, "open_endpoint", guarded_open)
    return sent


# -- wildcard specs --------------------------------------------------------------------


def test_broadcast_for_wildcard_specs() -> None:
    assert broadcast_for("10.77.0.*") == "10.77.0.255"
    assert broadcast_for(" 192.168.1.* ") == "192.168.1.255"
    assert broadcast_for("*") == BROADCAST
    for spec in ("10.77.*", "10.*.0.1", "10.77.0.1", "node*", "300.1.1.*", "::*"):
        assert broadcast_for(spec) is None, spec


def test_discovery_targets() -> None:
    specs = ["10.77.0.*", "10.77.0.2", "10.77.0.*", "10.*", "*"]
    assert discovery_targets(specs) == ["10.77.0.255", BROADCAST]
    assert discovery_targets(specs, multicast=True) == [IPV4_MULTICAST_GROUP]
    assert discovery_targets(["node1", "10.77.0.3"]) == []


def test_bad_targets_and_hosts_are_refused() -> None:
    async def main() -> None:
        discovery = Discovery(host=HOST, listen=False)
        for target in ("node1.example", "fd00::zz", "[fd00::1", ""):
            with pytest.raises(ConfigurationError):
                await discovery.start([target], Found().on_found)
        discovery.close()

    run(main())
    with pytest.raises(ConfigurationError, match="IP address"):
        Discovery(host="localhost")
    with pytest.raises(ConfigurationError, match="IP address"):
        Announcer(name="n", tcp_port=1, cpus=1, host="node.example")
    assert Discovery(host="[fd00::4]").host6 == "fd00::4"


def test_ipv6_patterns_ping_the_ipv6_group() -> None:
    specs = ["fd00:77::*", "10.77.0.*", "fd00:78::*"]
    assert discovery_targets(specs) == [IPV6_MULTICAST_GROUP, "10.77.0.255"]
    assert discovery_targets(["fd00::5"]) == []
    assert usable_source("fd00::5")
    assert not usable_source("fe80::5")
    assert not usable_source(IPV6_MULTICAST_GROUP)


# -- a node server answering a unicast ping ------------------------------------------


def test_node_answers_unicast_ping(
    tmp_path: Path, found: Found, no_broadcast: None
) -> None:
    async def main() -> None:
        config = NodeConfig(
            host=HOST,
            port=0,
            secret=b"discovery-test-secret",
            name="disco-node",
            cpus=3,
            dest_path=str(tmp_path / "dest"),
            discovery=True,
            discovery_port=0,
        )
        server = NodeServer(config)
        tcp_port = await server.start()
        try:
            assert server._announcer is not None
            udp_port = server._announcer.port
            discovery = Discovery(host=HOST, port=udp_port, listen=False)
            await discovery.start([HOST], found.on_found)
            try:
                await wait_until(lambda: bool(found.found))
                discovery.ping_again()  # answered again, reported once
                with pytest.raises(RuntimeError, match="already started"):
                    await discovery.start([HOST], found.on_found)
            finally:
                discovery.close()
        finally:
            await server.stop()
        assert found.found == [(HOST, tcp_port, "disco-node", 3)]

    run(main())


@pytest.mark.slow
def test_node_cli_discovery_options(tmp_path: Path, found: Found) -> None:
    async def free_udp_port() -> int:
        peer = await Peer.open()
        port = int(peer.transport.get_extra_info("sockname")[1])
        peer.close()
        return port

    udp_port = run(free_udp_port())
    with running_node(
        tmp_path, "--host", HOST, "--discovery", "--discovery-port", str(udp_port)
    ) as node:

        async def main() -> None:
            discovery = Discovery(host=HOST, port=udp_port, listen=False)
            await discovery.start([f"{HOST}:{udp_port}"], found.on_found)
            try:
                await wait_until(lambda: bool(found.found), timeout=10)
            finally:
                discovery.close()

        run(main(), timeout=15)
        assert found.found == [(HOST, node.port, "cli-node", 1)]
        assert f"answering pings on UDP {HOST}:{udp_port}" in node.log_text()


def test_config_checks_discovery_options(tmp_path: Path) -> None:
    config = NodeConfig(host="::1", ipv4_multicast=True, dest_path=str(tmp_path))
    with pytest.raises(ConfigurationError, match="needs an IPv4 host"):
        config.validate()
    NodeConfig(host="::1", discovery=True, dest_path=str(tmp_path)).validate()
    config = NodeConfig(discovery_port=65535, dest_path=str(tmp_path))
    with pytest.raises(ConfigurationError, match="discovery port"):
        config.validate()
    config = NodeConfig(ipv4_multicast=True, dest_path=str(tmp_path))
    config.validate()
    assert config.discovery


# -- the client never takes an address from a datagram ---------------------------------


def test_announce_reports_its_source_address(found: Found, no_broadcast: None) -> None:
    async def main() -> None:
        discovery = Discovery(host=HOST, listen_port=0)
        await discovery.start([], found.on_found)
        assert discovery.listen_address is not None
        listen_port = discovery.listen_address[1]
        forger = await Peer.open("127.0.0.2")
        try:
            # a node name that looks like an address changes nothing
            forger.send(announce(name="10.9.9.9"), listen_port)
            # a payload with an address field is not a valid announcement at all
            fields = msgpack.unpackb(announce(port=4343))
            fields.pop("leaving")
            fields["ip_addr"] = "10.9.9.9"
            forger.send(msgpack.packb(fields), listen_port)
            # an announcement that is a reply to someone else's ping is ignored
            forger.send(announce(port=4444, nonce=b"x" * d.NONCE_SIZE), listen_port)
            forger.send(announce(port=4545), listen_port)
            await wait_until(lambda: len(found.found) == 2)
        finally:
            forger.close()
            discovery.close()
        assert found.found == [
            ("127.0.0.2", 4242, "10.9.9.9", 2),
            ("127.0.0.2", 4545, "forger", 2),
        ]

    run(main())


def test_announcements_are_deduplicated(found: Found, no_broadcast: None) -> None:
    async def main() -> None:
        discovery = Discovery(host=HOST, listen_port=0)
        await discovery.start([], found.on_found, found.on_lost)
        assert discovery.listen_address is not None
        port = discovery.listen_address[1]
        node = await Peer.open()
        marker = await Peer.open("127.0.0.3")
        try:
            for _ in range(3):
                node.send(announce(), port)
            node.send(announce(version=99), port)  # another protocol: not used
            node.send(announce(version=99), port)
            marker.send(announce(), port)
            await wait_until(lambda: len(found.found) == 2)
            assert found.found[0] == (HOST, 4242, "forger", 2)
            assert discovery.found == [(HOST, 4242), ("127.0.0.3", 4242)]
            node.send(announce(leaving=True), port)  # leaves, then restarts
            node.send(announce(boot=b"C" * d.BOOT_SIZE), port)
            await wait_until(lambda: len(found.found) == 3)
            assert found.lost == [(HOST, 4242)]
            discovery.forget(HOST, 4242)  # e.g. after its connection was lost
            node.send(announce(boot=b"C" * d.BOOT_SIZE), port)
            await wait_until(lambda: len(found.found) == 4)
        finally:
            node.close()
            marker.close()
            discovery.close()

    run(main())
    assert {f[:2] for f in found.found} == {(HOST, 4242), ("127.0.0.3", 4242)}


def test_version_mismatch_is_logged_once(
    caplog: pytest.LogCaptureFixture, found: Found, no_broadcast: None
) -> None:
    async def main() -> None:
        discovery = Discovery(host=HOST, listen_port=0)
        await discovery.start([], found.on_found)
        assert discovery.listen_address is not None
        node = await Peer.open()
        try:
            for _ in range(3):
                node.send(announce(version=99), discovery.listen_address[1])
            node.send(announce(), discovery.listen_address[1])
            await wait_until(lambda: bool(found.found))
        finally:
            node.close()
            discovery.close()

    with caplog.at_level(logging.WARNING, "dispynb.transport.discovery"):
        run(main())
    assert len([r for r in caplog.records if "speaks protocol 99" in r.message]) == 1


def test_announcements_of_other_versions_from_many_addresses_log_a_few_lines(
    caplog: pytest.LogCaptureFixture, found: Found, no_broadcast: None
) -> None:
    """Anyone can send an announcement, from any source address (spoofed on a
    network; here 500 addresses of 127/8): each address of another protocol version
    was a warning line, without end and kept in a set without bound."""

    async def main() -> None:
        discovery = Discovery(host=HOST, listen_port=0)
        await discovery.start([], found.on_found)
        assert discovery.listen_address is not None
        try:
            for n in range(500):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.bind((f"127.0.{2 + n // 250}.{2 + n % 250}", 0))
                    sock.sendto(announce(version=99), discovery.listen_address)
                await asyncio.sleep(0.001)  # read: the socket's buffer drops none
            node = await Peer.open()
            try:  # after the others in the listener's queue
                node.send(announce(), discovery.listen_address[1])
                await wait_until(lambda: bool(found.found))
            finally:
                node.close()
        finally:
            discovery.close()

    with caplog.at_level(logging.WARNING, "dispynb.transport.discovery"):
        run(main())
    lines = [r for r in caplog.records if "protocol" in r.message]
    assert len(lines) == discovery_module.VERSION_WARNINGS + 1, len(lines)


# -- the node's announcer ----------------------------------------------------------


def test_announcer_announces_start_and_leaving(
    found: Found, no_broadcast: None
) -> None:
    async def main() -> None:
        discovery = Discovery(host=HOST, listen_port=0)
        await discovery.start([], found.on_found, found.on_lost)
        assert discovery.listen_address is not None
        target = f"{HOST}:{discovery.listen_address[1]}"
        announcer = Announcer(
            name="late\nnode", tcp_port=7777, cpus=0, host=HOST, port=0,
            announce_to=[target],
        )  # fmt: skip
        await announcer.start()
        try:
            await wait_until(lambda: bool(found.found))
        finally:
            announcer.close()
        await wait_until(lambda: bool(found.lost))
        discovery.close()
        assert found.found == [(HOST, 7777, "late?node", 1)]
        assert found.lost == [(HOST, 7777)]

    run(main())


def test_announcer_ignores_junk_and_rate_limits(
    monkeypatch: pytest.MonkeyPatch, no_broadcast: None
) -> None:
    # one rate window for the whole test
    monkeypatch.setattr(
        announce_module, "time", types.SimpleNamespace(monotonic=lambda: 1000.0)
    )

    async def main() -> tuple[list[tuple[bytes, Any]], int]:
        announcer = Announcer(name="n", tcp_port=7777, cpus=2, host=HOST, port=0)
        port = await announcer.start()
        flooder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        flooder.bind((HOST, 0))
        flooder.setblocking(False)
        marker = await Peer.open("127.0.0.3")
        ping = d.encode(d.Ping(nonce=d.new_nonce()))
        received = []
        try:
            for junk in (b"", b"\xc1", announce(), b"x" * 2000):
                flooder.sendto(junk, (HOST, port))
            for _ in range(REPLIES_PER_SOURCE + 10):
                flooder.sendto(ping, (HOST, port))
            marker.send(ping, port)
            # replies go out in order: once the marker's has come, all are queued
            await wait_until(lambda: bool(marker.received))
            while True:
                try:
                    received.append(flooder.recvfrom(4096))
                except BlockingIOError:
                    break
        finally:
            flooder.close()
            marker.close()
            announcer.close(leaving=False)
        return received, len(marker.received)

    received, marker_replies = run(main())
    assert len(received) == REPLIES_PER_SOURCE
    assert all(isinstance(d.decode(data), d.Announce) for data, _ in received)
    assert marker_replies == 1


def test_pings_over_the_limit_log_a_few_lines_whatever_the_sources_and_seconds(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    no_broadcast: None,
) -> None:
    """Anyone can ping a node, from any source address, every second: 30 addresses
    of 127/8 each over the limit in a second of its own, then the first one for 10
    more seconds, were 40 lines (one per source per second)."""
    clock = [1000.0]
    monkeypatch.setattr(
        announce_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0])
    )
    sources = [f"127.0.4.{2 + n}" for n in range(30)] + ["127.0.4.2"] * 10

    async def main() -> None:
        announcer = Announcer(name="n", tcp_port=7777, cpus=2, host=HOST, port=0)
        port = await announcer.start()
        ping = d.encode(d.Ping(nonce=d.new_nonce()))
        marker = await Peer.open("127.0.0.3")
        try:
            for second, source in enumerate(sources):
                clock[0] = 1000.0 + second
                flooder = await Peer.open(source)
                try:
                    for _ in range(REPLIES_PER_SOURCE + 1):
                        flooder.send(ping, port)
                    marker.send(ping, port)
                    # Answered in order: the marker's reply comes after the rest.
                    await wait_until(lambda n=second + 1: len(marker.received) == n)
                finally:
                    flooder.close()
        finally:
            marker.close()
            announcer.close(leaving=False)

    with caplog.at_level(logging.INFO, "nodeserver.announce"):
        run(main())
    lines = [r.message for r in caplog.records if "ping too often" in r.message
             or "too many pings" in r.message]  # fmt: skip
    assert len(lines) == 16 + 1, lines  # 16 sources (PING_WARNINGS), then one
    assert "more than 16 sources ping too often" in lines[-1]


def test_announced_ext_address_is_recorded_and_forgotten(
    found: Found, no_broadcast: None
) -> None:
    async def main() -> None:
        discovery = Discovery(host=HOST, listen_port=0)
        await discovery.start([], found.on_found, found.on_lost)
        assert discovery.listen_address is not None
        target = f"{HOST}:{discovery.listen_address[1]}"
        announcer = Announcer(
            name="n", tcp_port=7777, cpus=1, host=HOST, port=0,
            announce_to=[target], ext="10.2.0.9",
        )  # fmt: skip
        await announcer.start()
        try:
            await wait_until(lambda: bool(found.found))
            # Reported as the sender's address; the claim is kept apart.
            assert found.found == [(HOST, 7777, "n", 1)]
            assert discovery.ext_address(HOST, 7777) == "10.2.0.9"
            assert discovery.ext_address(HOST, 7778) == ""
        finally:
            announcer.close()
        await wait_until(lambda: bool(found.lost))
        assert discovery.ext_address(HOST, 7777) == ""
        discovery.close()

    run(main())


def test_node_config_ext_host_needs_discovery_and_a_unicast_address() -> None:
    # On loopback only, discovery is off unless asked: the error said to leave
    # out --no-discovery, which was not given.
    with pytest.raises(ConfigurationError, match="unless --discovery is given"):
        NodeConfig(port=0, ext_host="10.2.0.9").validate()
    with pytest.raises(ConfigurationError, match="leave out --no-discovery"):
        NodeConfig(port=0, discovery=False, ext_host="10.2.0.9").validate()
    for bad in ("0.0.0.0", "239.255.61.59", "no-such-host.invalid"):
        with pytest.raises(ConfigurationError, match="--ext-host"):
            NodeConfig(port=0, discovery=True, ext_host=bad).validate()
    config = NodeConfig(port=0, discovery=True, ext_host="[fd00::5]")
    config.validate()
    assert config.ext_host == "fd00::5"
    config = NodeConfig(port=0, discovery=True, ext_host="localhost")
    config.validate()
    assert config.ext_host in ("127.0.0.1", "::1")


def test_node_named_by_host_name_answers_discovery_at_its_address(
    tmp_path: Path, found: Found, no_broadcast: None
) -> None:
    """``dispynb-node -i <name>`` as with dispynode: the name is looked up for
    discovery (before, only IP addresses could answer pings)."""

    async def main() -> None:
        server = NodeServer(
            NodeConfig(
                host="localhost",
                port=0,
                secret=b"discovery-test-secret",
                dest_path=str(tmp_path / "dest"),
                discovery=True,
                discovery_port=0,
            )
        )
        await server.start()
        try:
            assert server._announcer is not None
            assert server._announcer.host == HOST
        finally:
            await server.stop()

    run(main())
