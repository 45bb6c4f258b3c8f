"""Tests of node address parsing, formatting and loopback checks."""

from __future__ import annotations

import socket

import pytest

from dispynb.defaults import NODE_PORT
from dispynb.errors import ConfigurationError
from dispynb.transport import addressing
from dispynb.transport.addressing import format_address, is_loopback, parse_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node1", ("node1", NODE_PORT)),
        ("  node1  ", ("node1", NODE_PORT)),
        ("node1:9000", ("node1", 9000)),
        ("127.0.0.1", ("127.0.0.1", NODE_PORT)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("10.0.0.5:65535", ("10.0.0.5", 65535)),
        ("[::1]:9000", ("::1", 9000)),
        ("[::1]", ("::1", NODE_PORT)),
        ("::1", ("::1", NODE_PORT)),
        ("fe80::1:2", ("fe80::1:2", NODE_PORT)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
    ],
)
def test_parse_address_forms_give_host_and_port(text, expected):
    assert parse_address(text) == expected


def test_parse_address_default_port_used_when_absent():
    assert parse_address("host", default_port=1234) == ("host", 1234)
    assert parse_address("host:5", default_port=1234) == ("host", 5)


@pytest.mark.parametrize(
    "text",
    [
        "host:abc",
        "host:",
        "host:-1",
        "host:65536",
        "host:99999999999999999999",
        "[::1]:x",
        "[::1]:",
        "[::1]9000",
        "[::1",
    ],
)
def test_parse_address_bad_port_or_brackets_raises(text):
    with pytest.raises(ConfigurationError, match="address"):
        parse_address(text)


@pytest.mark.parametrize("text", ["", "   "])
def test_parse_address_empty_raises(text):
    with pytest.raises(ConfigurationError, match="empty"):
        parse_address(text)


def test_parse_address_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_address("host:port")


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("node1", 9711, "node1:9711"),
        ("127.0.0.1", 1, "127.0.0.1:1"),
        ("::1", 80, "[::1]:80"),
    ],
)
def test_format_address_brackets_ipv6_only(host, port, text):
    assert format_address(host, port) == text
    assert parse_address(text) == (host, port)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.1.2.3", "::1"])
def test_is_loopback_loopback_addresses_true(host):
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host", ["", "0.0.0.0", "::", "10.0.0.1", "192.168.1.1", "8.8.8.8", "fe80::1"]
)
def test_is_loopback_other_addresses_false(host):
    assert not is_loopback(host)


def _fake_getaddrinfo(*addresses: str):
    def getaddrinfo(host, port, *args, **kwargs):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 0))
            for address in addresses
        ]

    return getaddrinfo


def test_is_loopback_name_resolving_to_loopback_only_true(monkeypatch):
    monkeypatch.setattr(
        addressing.socket, "getaddrinfo", _fake_getaddrinfo("127.0.0.1", "::1")
    )
    assert is_loopback("my-loopback-alias")


def test_is_loopback_name_resolving_to_any_other_address_false(monkeypatch):
    monkeypatch.setattr(
        addressing.socket, "getaddrinfo", _fake_getaddrinfo("127.0.0.1", "10.0.0.2")
    )
    assert not is_loopback("mixed-host")


def test_is_loopback_name_resolving_to_nothing_false(monkeypatch):
    monkeypatch.setattr(addressing.socket, "getaddrinfo", _fake_getaddrinfo())
    assert not is_loopback("empty-host")


def test_is_loopback_unresolvable_name_false(monkeypatch):
    def fail(*args, **kwargs):
        raise socket.gaierror("no such host")

    monkeypatch.setattr(addressing.socket, "getaddrinfo", fail)
    assert not is_loopback("no-such-host.invalid")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _names_ipv6(host: str) -> bool:
    try:
        return bool(socket.getaddrinfo(host, 0, socket.AF_INET6))
    except socket.gaierror:
        return False


def test_bind_listening_localhost_one_port_for_every_address() -> None:
    sockets = addressing.bind_listening("localhost", 0)
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        families = {sock.family for sock in sockets}
        assert len(ports) == 1 and 0 not in ports
        assert socket.AF_INET in families
        if _has_ipv6_loopback() and _names_ipv6("localhost"):
            assert socket.AF_INET6 in families
        for sock in sockets:
            assert not sock.getblocking()
            if sock.family == socket.AF_INET6:
                only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                assert only == 1
        # Listening: a client connects on the shared port.
        with socket.create_connection(("127.0.0.1", ports.pop()), timeout=5):
            pass
    finally:
        for sock in sockets:
            sock.close()


def test_bind_listening_port_in_use_raises_and_closes_what_it_opened() -> None:
    first = addressing.bind_listening("127.0.0.1", 0)
    try:
        port = first[0].getsockname()[1]
        with pytest.raises(OSError):
            addressing.bind_listening("127.0.0.1", port)
    finally:
        for sock in first:
            sock.close()
