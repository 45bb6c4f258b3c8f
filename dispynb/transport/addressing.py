"""Parsing and formatting of node addresses; loopback checks."""

from __future__ import annotations

import errno
import ipaddress
import socket

from dispynb.defaults import NODE_PORT
from dispynb.errors import ConfigurationError


def parse_address(text: str, default_port: int = NODE_PORT) -> tuple[str, int]:
    """Split ``host``, ``host:port``, ``[v6]:port`` or ``v6`` into host and port."""
    text = text.strip()
    if not text:
        raise ConfigurationError("empty node address")
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigurationError(f"bad address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigurationError(f"bad address {text!r}")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text, text)
    return host, port


def _port(text: str, whole: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"bad port in address {whole!r}: use host:port")
    return port


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """True if every address ``host`` resolves to is a loopback address."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(info[4][0]).is_loopback for info in infos
    )


#: Connections the kernel queues for a listening socket before we accept them.
LISTEN_BACKLOG = 128


def bind_listening(host: str, port: int, option: str = "") -> list[socket.socket]:
    """Listening, non-blocking TCP sockets on every address ``host`` resolves to.

    A port in use raises OSError saying to give another ``option`` (the caller's
    name for the port: ``--port``), or to choose another port without one.

    ``host`` may name several addresses (``localhost``: ``127.0.0.1`` and ``::1``);
    with ``port`` 0 they all get the port the first one was given. IPv6 sockets are
    IPv6 only (an IPv4 address of the same name gets its own socket). An address
    family the system lacks is skipped, and so is ``::1`` where loopback has no IPv6.

    Written here rather than taken from ``tornado.netutil``: importing that builds
    TLS contexts with the system's CA store at import time (some 70 ms of CPU and
    3 MB in every node server, which needs neither).
    """
    flags = socket.AI_PASSIVE
    family = socket.AF_UNSPEC if socket.has_ipv6 else socket.AF_INET
    try:
        found = socket.getaddrinfo(
            host or None, port, family, socket.SOCK_STREAM, 0, flags
        )
    except socket.gaierror as exc:  # the OS names no host
        raise OSError(
            exc.errno,
            f"cannot listen on {host!r}: the name does not resolve "
            f"({exc.strerror or exc}); give one of this machine's addresses or names",
        ) from None
    sockets: list[socket.socket] = []
    chosen = port
    try:
        for af, kind, proto, _name, address in sorted(
            dict.fromkeys(found), key=lambda info: info[0]
        ):
            try:
                sock = socket.socket(af, kind, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    continue
                raise
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if af == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setblocking(False)
                sock.bind((address[0], chosen, *address[2:]))
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRNOTAVAIL and address[0] == "::1":
                    continue  # no IPv6 on this machine's loopback
                if exc.errno == errno.EADDRINUSE:  # the OS names no address, no fix
                    taken = format_address(str(address[0]), chosen)
                    fix = f"give another {option}" if option else "choose another port"
                    raise OSError(
                        exc.errno,
                        f"{taken} is already in use (by a node or scheduler already "
                        f"running, or another program): stop it, or {fix}",
                    ) from None
                if exc.errno == errno.EADDRNOTAVAIL:  # nor here
                    raise OSError(
                        exc.errno,
                        f"cannot listen on {format_address(str(address[0]), chosen)}: "
                        "no interface of this machine has that address (not up yet? "
                        "under systemd start after network-online.target); give one "
                        "of its addresses, or 0.0.0.0 for all",
                    ) from None
                raise
            chosen = sock.getsockname()[1]
            sock.listen(LISTEN_BACKLOG)
            sockets.append(sock)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(errno.EADDRNOTAVAIL, f"no address to listen on for {host!r}")
    return sockets
