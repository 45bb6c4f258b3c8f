"""Discovery datagrams, sans-IO: `Ping` ("who is there?") and `Announce` ("I am here").

Each datagram is one small msgpack map with a fixed set of keys: a magic string and a
format version, the op, and the op's fields. Nothing in it is a secret or a credential.
A client connects to the address a datagram came *from* (with the announced TCP port)
and then authenticates over TCP as usual. The one exception is an announcement's
optional ``ext`` address (``dispynb-node --ext-host``, for NAT and multi-homed nodes):
a claim that a client follows only when the address fits a node spec its user gave
that is narrower than ``'*'`` (see `dispynb.backends.finder`).

`decode` accepts only exact, well-typed maps within tight size limits, so a datagram
from anyone on the network can be decoded safely; anything else raises
`DiscoveryError`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from typing import Any

import msgpack

from dispynb.errors import MessageError
from dispynb.protocol.messages import PROTOCOL_VERSION

#: First field of every discovery datagram.
MAGIC = "dispynb-discovery"

#: Version of the datagram layout (not of the TCP protocol, which ``version`` carries).
FORMAT = 1

#: Largest datagram encoded or decoded, in bytes.
MAX_DATAGRAM = 512

#: Size of a ping's nonce (a reply echoes it).
NONCE_SIZE = 16

#: Size of a node's boot id: random per node process, so a restarted node is new.
BOOT_SIZE = 8

#: Longest node name in an announcement, in UTF-8 bytes (longer names are cut).
MAX_NAME = 128

_PING_KEYS = frozenset({"magic", "format", "op", "version", "nonce"})
_ANNOUNCE_KEYS = frozenset(
    {
        "magic",
        "format",
        "op",
        "version",
        "name",
        "port",
        "cpus",
        "boot",
        "nonce",
        "leaving",
    }
)
#: Longest ``ext`` address (an IPv6 literal has at most 45 characters).
MAX_EXT = 64

_KEYS = {"ping": [_PING_KEYS], "announce": [_ANNOUNCE_KEYS, _ANNOUNCE_KEYS | {"ext"}]}
_LIMITS = {
    "max_str_len": MAX_DATAGRAM,
    "max_bin_len": max(NONCE_SIZE, BOOT_SIZE),
    "max_array_len": 0,
    "max_map_len": len(_ANNOUNCE_KEYS) + 1,
    "max_ext_len": 0,
}


class DiscoveryError(MessageError):
    """A discovery datagram is malformed, oversized or not ours."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    """Client -> nodes: who is there? Nodes reply with an `Announce` echoing it."""

    nonce: bytes
    version: int = PROTOCOL_VERSION


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Announce:
    """Node -> clients: a node server listens on TCP ``port`` of the sender's address.

    ``nonce`` is the pinging client's nonce in a reply, empty in an announcement sent
    on the node's own initiative; ``leaving`` is set when the node shuts down.
    ``ext`` is an IP address the node says clients should use instead of the
    sender's (``--ext-host``), or empty; it is a claim, never trusted by itself.
    """

    name: str
    port: int
    cpus: int
    boot: bytes
    version: int = PROTOCOL_VERSION
    nonce: bytes = b""
    leaving: bool = False
    ext: str = ""


Datagram = Ping | Announce


def new_nonce() -> bytes:
    """A random ping nonce."""
    return os.urandom(NONCE_SIZE)


def new_boot_id() -> bytes:
    """A random boot id for a node process."""
    return os.urandom(BOOT_SIZE)


def fit_name(name: str) -> str:
    """``name`` made valid for an announcement: printable, at most `MAX_NAME` bytes."""
    text = "".join(c if c.isprintable() else "?" for c in name) or "?"
    data = text.encode()[:MAX_NAME]
    return data.decode(errors="ignore") or "?"


def encode(message: Datagram) -> bytes:
    """The datagram for ``message``; raises `DiscoveryError` if a field is invalid."""
    if isinstance(message, Ping):
        fields: dict[str, Any] = {
            "op": "ping",
            "version": message.version,
            "nonce": message.nonce,
        }
    elif isinstance(message, Announce):
        fields = {
            "op": "announce",
            "version": message.version,
            "name": message.name,
            "port": message.port,
            "cpus": message.cpus,
            "boot": message.boot,
            "nonce": message.nonce,
            "leaving": message.leaving,
        }
        if message.ext:  # only then: older clients know the other keys only
            fields["ext"] = message.ext
    else:
        raise DiscoveryError(f"not a discovery message: {type(message).__name__}")
    _check(fields)
    data: bytes = msgpack.packb(
        {"magic": MAGIC, "format": FORMAT, **fields}, use_bin_type=True
    )
    if len(data) > MAX_DATAGRAM:
        raise DiscoveryError(f"datagram of {len(data)} bytes over {MAX_DATAGRAM}")
    return data


def decode(data: bytes | memoryview) -> Datagram:
    """The message in a datagram; raises `DiscoveryError` for anything malformed."""
    if len(data) > MAX_DATAGRAM:
        raise DiscoveryError(f"datagram of {len(data)} bytes over {MAX_DATAGRAM}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, **_LIMITS)
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        raise DiscoveryError(f"undecodable datagram: {reason}") from exc
    if type(obj) is not dict:
        raise DiscoveryError("datagram is not a map")
    if obj.get("magic") != MAGIC:
        raise DiscoveryError("not a dispynb discovery datagram (wrong magic)")
    if obj.get("format") != FORMAT or type(obj.get("format")) is not int:
        raise DiscoveryError(f"unsupported discovery format {obj.get('format')!r}")
    op = obj.get("op")
    layouts = _KEYS.get(op) if type(op) is str else None
    if layouts is None:
        raise DiscoveryError(f"unknown discovery op {op!r}")
    if obj.keys() not in layouts:
        keys = layouts[0]
        extra = sorted(map(str, obj.keys() - keys))
        missing = sorted(keys - obj.keys())
        raise DiscoveryError(f"{op} datagram: extra keys {extra}, missing {missing}")
    fields = {k: v for k, v in obj.items() if k not in ("magic", "format")}
    _check(fields)
    del fields["op"]
    if op == "ping":
        return Ping(**fields)
    return Announce(**fields)


def _check(fields: dict[str, Any]) -> None:
    op = fields["op"]
    _int(fields, "version", 0, 0xFFFF)
    nonce = _bytes(fields, "nonce")
    if op == "ping":
        if len(nonce) != NONCE_SIZE:
            raise DiscoveryError(f"ping nonce must have {NONCE_SIZE} bytes")
        return
    if len(nonce) not in (0, NONCE_SIZE):
        raise DiscoveryError(f"announce nonce must have 0 or {NONCE_SIZE} bytes")
    _int(fields, "port", 1, 0xFFFF)
    _int(fields, "cpus", 1, 0xFFFF)
    if len(_bytes(fields, "boot")) != BOOT_SIZE:
        raise DiscoveryError(f"announce boot id must have {BOOT_SIZE} bytes")
    if type(fields["leaving"]) is not bool:
        raise DiscoveryError("announce field 'leaving' must be a bool")
    name = fields["name"]
    if type(name) is not str or not name or not name.isprintable():
        raise DiscoveryError("announce name must be a non-empty printable string")
    if len(name.encode()) > MAX_NAME:
        raise DiscoveryError(f"announce name over {MAX_NAME} bytes")
    if "ext" in fields:
        ext = fields["ext"]
        if type(ext) is not str or not 0 < len(ext) <= MAX_EXT:
            raise DiscoveryError("announce field 'ext' must be a non-empty string")
        try:
            address = ipaddress.ip_address(ext)
        except ValueError:
            raise DiscoveryError("announce field 'ext' must be an IP address") from None
        if address.is_unspecified or address.is_multicast:
            raise DiscoveryError("announce field 'ext' must be a unicast address")


def _int(fields: dict[str, Any], key: str, low: int, high: int) -> None:
    value = fields[key]
    if type(value) is not int or not low <= value <= high:
        raise DiscoveryError(f"field {key!r} must be an int in {low}..{high}")


def _bytes(fields: dict[str, Any], key: str) -> bytes:
    value = fields[key]
    if type(value) is not bytes:
        raise DiscoveryError(f"field {key!r} must be bytes")
    return value
