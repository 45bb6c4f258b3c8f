"""Discovery datagrams: round trips, and rejection of anything malformed."""

from __future__ import annotations

import msgpack
import pytest

from dispynb.protocol.discovery import (
    BOOT_SIZE,
    FORMAT,
    MAGIC,
    MAX_DATAGRAM,
    MAX_NAME,
    NONCE_SIZE,
    Announce,
    DiscoveryError,
    Ping,
    decode,
    encode,
    fit_name,
    new_boot_id,
    new_nonce,
)
from dispynb.protocol.messages import PROTOCOL_VERSION

NONCE = b"n" * NONCE_SIZE
BOOT = b"b" * BOOT_SIZE


def announce(**changes: object) -> Announce:
    fields: dict[str, object] = {
        "name": "node-1",
        "port": 9711,
        "cpus": 4,
        "boot": BOOT,
        "nonce": NONCE,
    }
    fields.update(changes)
    return Announce(**fields)  # type: ignore[arg-type]


def raw(op: str = "announce", **changes: object) -> bytes:
    """A datagram built by hand (to break it in one place)."""
    fields: dict[str, object] = {"magic": MAGIC, "format": FORMAT, "op": op}
    if op == "ping":
        fields.update(version=PROTOCOL_VERSION, nonce=NONCE)
    else:
        fields.update(
            version=PROTOCOL_VERSION,
            name="node-1",
            port=9711,
            cpus=4,
            boot=BOOT,
            nonce=b"",
            leaving=False,
        )
    for key, value in changes.items():
        if value is _DROP:
            fields.pop(key)
        else:
            fields[key] = value
    return msgpack.packb(fields, use_bin_type=True)


_DROP = object()


@pytest.mark.parametrize(
    "message",
    [
        Ping(nonce=NONCE),
        Ping(nonce=new_nonce(), version=7),
        announce(),
        announce(nonce=b"", leaving=True),
        announce(name="é" * (MAX_NAME // 2), port=1, cpus=65535, boot=new_boot_id()),
        announce(ext="203.0.113.7"),
        announce(ext="fd00:77::1", leaving=True),
        announce(name="n" * MAX_NAME, ext="fd00:" + "ffff:" * 6 + "ffff"),
    ],
)
def test_round_trip(message: Ping | Announce) -> None:
    data = encode(message)
    assert len(data) <= MAX_DATAGRAM
    assert decode(data) == message


def test_hand_built_datagrams_decode() -> None:
    assert decode(raw("ping")) == Ping(nonce=NONCE)
    assert decode(raw()) == announce(nonce=b"")
    assert decode(raw(ext="10.1.2.3")) == announce(nonce=b"", ext="10.1.2.3")


def test_ext_is_sent_only_when_set() -> None:
    assert "ext" not in msgpack.unpackb(encode(announce()))
    assert msgpack.unpackb(encode(announce(ext="10.1.2.3")))["ext"] == "10.1.2.3"


def test_datagrams_are_small_and_carry_no_secret_fields() -> None:
    data = encode(announce(name="n" * MAX_NAME))
    assert len(data) < 300
    keys = set(msgpack.unpackb(data))
    assert keys == {
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


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "undecodable"),
        (b"\xc1", "undecodable"),
        (b"GET / HTTP/1.1\r\n\r\n", "undecodable"),
        (msgpack.packb([1, 2]), "undecodable"),
        (msgpack.packb("text"), "not a map"),
        (msgpack.packb({1: 2}), "undecodable"),
        (raw(magic="dispy"), "wrong magic"),
        (raw(magic=_DROP), "wrong magic"),
        (raw(format=2), "format"),
        (raw(format=True), "format"),
        (raw(op="pong"), "unknown discovery op"),
        (raw(op=["ping"]), "undecodable"),
        (raw(op={}), "unknown discovery op"),
        (raw(extra=1, ext="10.0.0.1"), "max_map_len"),
        (raw(extra=1), "extra keys"),
        (raw(ext=""), "'ext'"),
        (raw(ext=5), "'ext'"),
        (raw(ext="node.example"), "IP address"),
        (raw(ext="0.0.0.0"), "unicast"),
        (raw(ext="ff02::1"), "unicast"),
        (raw(ext="1" * 65), "'ext'"),
        (raw("ping", ext="10.0.0.1"), "extra keys"),
        (raw(extra=1, leaving=_DROP), "extra keys"),
        (raw(cpus=_DROP), "missing"),
        (raw("ping", name="x"), "extra keys"),
        (raw(port=0), "'port'"),
        (raw(port=65536), "'port'"),
        (raw(port="9711"), "'port'"),
        (raw(port=True), "'port'"),
        (raw(port=9711.0), "'port'"),
        (raw(cpus=0), "'cpus'"),
        (raw(cpus=-1), "'cpus'"),
        (raw(version=-1), "'version'"),
        (raw(boot=b"short"), "boot id"),
        (raw(boot="b" * BOOT_SIZE), "'boot'"),
        (raw(nonce=b"x" * 5), "nonce"),
        (raw("ping", nonce=b""), "ping nonce"),
        (raw(leaving=1), "'leaving'"),
        (raw(name=""), "name"),
        (raw(name="a\nb"), "name"),
        (raw(name=b"node"), "name"),
        (raw(name="n" * (MAX_NAME + 1)), "over"),
        (raw(name={"a": 1}), "name"),
        (raw() + b"\x00", "undecodable"),
        (b"\x00" * (MAX_DATAGRAM + 1), "bytes over"),
        (raw(name="n" * 600), "over"),
    ],
)
def test_malformed_datagrams_are_rejected(data: bytes, reason: str) -> None:
    with pytest.raises(DiscoveryError, match=reason):
        decode(data)


def test_bombs_are_rejected_before_allocation() -> None:
    # a map header claiming 2**32-1 entries, a bin claiming 2**32-1 bytes, deep nesting
    for data in (
        b"\xdf\xff\xff\xff\xff",
        b"\xc6\xff\xff\xff\xff",
        b"\x81\xa1a" * 100 + b"\xc0",
    ):
        with pytest.raises(DiscoveryError):
            decode(data)


def test_invalid_messages_are_not_encoded() -> None:
    with pytest.raises(DiscoveryError, match="ping nonce"):
        encode(Ping(nonce=b"short"))
    with pytest.raises(DiscoveryError, match="'port'"):
        encode(announce(port=0))
    with pytest.raises(DiscoveryError, match="name"):
        encode(announce(name="x" * (MAX_NAME + 1)))
    with pytest.raises(DiscoveryError, match="not a discovery message"):
        encode("ping")  # type: ignore[arg-type]


def test_fit_name_makes_any_name_valid() -> None:
    for name in ("", "a\tb", "ü" * 200, "node-1"):
        fitted = fit_name(name)
        assert decode(encode(announce(name=fitted))).name == fitted  # type: ignore[union-attr]
    assert fit_name("node-1") == "node-1"
    assert fit_name("a\tb") == "a?b"
    assert len(fit_name("ü" * 200).encode()) <= MAX_NAME
