"""What a person types in the lab panel's Discover box, as discovery targets.

`panel_targets` reads the box's entries: node or broadcast addresses, host names
(``localhost``, ``node1``, resolved here), each optionally with the nodes' UDP
discovery port. A mistake is said in the panel's words, once (the panel puts
"Discover failed:" before it): what was typed, and what to type instead.
"""

from __future__ import annotations

import ipaddress
import socket

from dispynb.defaults import DISCOVERY_PORT
from dispynb.errors import ConfigurationError
from dispynb.transport.addressing import format_address

__all__ = ["MAX_ADDRESSES", "panel_targets"]

#: Addresses one Discover request may ping.
MAX_ADDRESSES = 256
#: Characters of a typed address quoted back in an error.
SHOWN = 60

#: What the box takes, said after a mistake.
_WHAT_TO_TYPE = (
    "type the nodes' addresses or host names (10.0.0.5, node1) or a broadcast "
    "address (10.0.0.255), or leave the box empty to ask the local networks"
)


def panel_targets(addresses: list[str]) -> list[str]:
    """The discovery targets for what was typed in the panel's box: each address
    or host name (resolved to its address) with the port typed, if any. A port
    that is not the default discovery port may be a node's TCP port, as the
    panel's list (and every cell) shows a node: that host's default discovery
    port is pinged too.

    Raises `ConfigurationError` naming the first entry that cannot be pinged (a
    name that does not resolve, a port out of range) and what to type instead.
    """
    from dispynb.transport.discovery import BROADCAST

    if len(addresses) > MAX_ADDRESSES:
        raise ConfigurationError(
            f"{len(addresses)} addresses to discover: give at most {MAX_ADDRESSES} "
            "(or a broadcast address such as 10.0.0.255)"
        )
    targets: list[str] = []
    for typed in addresses:
        text = typed.strip()
        if text == BROADCAST:
            targets.append(text)
            continue
        host, port = _split(text)
        address = _resolve(host, text)
        for each in (port or DISCOVERY_PORT, DISCOVERY_PORT):
            target = format_address(address, each)
            if target not in targets:
                targets.append(target)
    return targets


def _split(text: str) -> tuple[str, int | None]:
    """``text`` as host and port (None if none was typed): ``10.0.0.5``,
    ``10.0.0.5:9712``, ``node1:9712``, ``fd00::2``, ``[fd00::2]:9712``."""
    host, port_text = text, ""
    if text.startswith("[") and "]" in text:
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ConfigurationError(f"{_shown(text)}: {_WHAT_TO_TYPE}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigurationError(
            f"{_shown(text)}: the port after ':' is the nodes' UDP discovery port, "
            f"a number from 1 to 65535 ({DISCOVERY_PORT} unless the nodes were "
            "started with another --discovery-port); or leave it out"
        )
    return host, int(port_text)


def _resolve(host: str, text: str) -> str:
    """``host``'s IP address: itself, else what the name resolves to (IPv4 first,
    as the nodes' discovery listens on IPv4 by default)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        infos = []
    found = [str(info[4][0]) for info in infos]
    found.sort(key=lambda address: ":" in address)  # IPv4 first
    if not found:
        raise ConfigurationError(
            f"{_shown(text)} is not an IP address, nor a host name this machine "
            f"knows: {_WHAT_TO_TYPE}"
        )
    return found[0].partition("%")[0]


def _shown(text: str) -> str:
    """``text`` quoted, cut to `SHOWN` characters."""
    return repr(text if len(text) <= SHOWN else text[:SHOWN] + "...")
