"""Node registration, sans-IO: a launched node tells its client where it is.

A launched node (``dispynb-node --register HOST:PORT``) does not know its client in
advance, and the client does not know where a batch system or an orchestrator put
the node. So the node connects to the client's registration listener over TCP and:

1. the client sends a `Challenge`: a fresh random nonce for this connection only;
2. the node answers with a `Registration` (its name, TCP port, CPUs, boot id) whose
   ``proof`` is ``HMAC(secret, label | nonce | fields)``;
3. the client checks the proof and answers one byte, `ACCEPTED` or `REJECTED`.

The secret never crosses the wire and a proof is good for one nonce only, so it cannot
be replayed. Only then does the client connect to the node, at the address the
registration *connection* came from (TCP: the peer address cannot be spoofed the way
a datagram's can) and the registered port, and authenticate it with the usual
handshake (protocol v3, client proves first). An unauthenticated peer of the
registration port gets a nonce and a closed connection: it can never make the client
connect anywhere.

Messages are length-prefixed msgpack maps of at most `MAX_MESSAGE` bytes; `decode_*`
accept only exact, well-typed maps and raise `RegistrationError` otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from typing import Any

import msgpack

from dispynb.errors import MessageError
from dispynb.protocol.discovery import BOOT_SIZE, MAX_NAME
from dispynb.protocol.messages import PROTOCOL_VERSION

MAGIC = "dispynb-register"
NONCE_SIZE = 32
PROOF_SIZE = 32
#: Largest message, in bytes (each is preceded by its length as 2 bytes, big-endian).
MAX_MESSAGE = 512
ACCEPTED = b"\x01"
REJECTED = b"\x00"

_LABEL = b"dispynb-register-v1"
_CHALLENGE_KEYS = frozenset({"magic", "version", "nonce"})
_REGISTRATION_KEYS = frozenset(
    {"magic", "version", "name", "port", "cpus", "boot", "proof"}
)
_LIMITS = {
    "max_str_len": MAX_MESSAGE,
    "max_bin_len": max(NONCE_SIZE, PROOF_SIZE, BOOT_SIZE),
    "max_array_len": 0,
    "max_map_len": len(_REGISTRATION_KEYS),
    "max_ext_len": 0,
}


class RegistrationError(MessageError):
    """A registration message is malformed, oversized or carries a wrong proof."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Challenge:
    """Client -> node: prove you know the secret for this nonce."""

    nonce: bytes
    version: int = PROTOCOL_VERSION


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Registration:
    """Node -> client: a node server listens on TCP ``port`` at this connection's
    source address; ``proof`` binds the fields to the client's nonce."""

    name: str
    port: int
    cpus: int
    boot: bytes
    proof: bytes = b""
    version: int = PROTOCOL_VERSION


def new_challenge() -> Challenge:
    """A challenge with a fresh random nonce."""
    return Challenge(nonce=os.urandom(NONCE_SIZE))


def _binding(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def compute_proof(secret: bytes, nonce: bytes, reg: Registration) -> bytes:
    """``HMAC(secret, label | nonce | version | name | port | cpus | boot)``."""
    key = hashlib.sha256(_binding(_LABEL, b"key", secret)).digest()
    data = _binding(
        _LABEL,
        nonce,
        str(reg.version).encode(),
        reg.name.encode(),
        str(reg.port).encode(),
        str(reg.cpus).encode(),
        reg.boot,
    )
    return hmac.digest(key, data, "sha256")


def sign(secret: bytes, nonce: bytes, reg: Registration) -> Registration:
    """``reg`` with its proof for ``nonce``."""
    return dataclasses.replace(reg, proof=compute_proof(secret, nonce, reg))


def verify(secret: bytes, nonce: bytes, reg: Registration) -> bool:
    """Whether ``reg``'s proof is right for ``nonce`` (constant time)."""
    return hmac.compare_digest(reg.proof, compute_proof(secret, nonce, reg))


def frame(payload: bytes) -> bytes:
    """``payload`` preceded by its 2-byte length."""
    if len(payload) > MAX_MESSAGE:
        raise RegistrationError(f"message of {len(payload)} bytes over {MAX_MESSAGE}")
    return len(payload).to_bytes(2, "big") + payload


def encode_challenge(challenge: Challenge) -> bytes:
    """The framed challenge."""
    return frame(
        msgpack.packb(
            {"magic": MAGIC, "version": challenge.version, "nonce": challenge.nonce},
            use_bin_type=True,
        )
    )


def encode_registration(reg: Registration) -> bytes:
    """The framed registration (checked like a received one)."""
    fields = {
        "magic": MAGIC,
        "version": reg.version,
        "name": reg.name,
        "port": reg.port,
        "cpus": reg.cpus,
        "boot": reg.boot,
        "proof": reg.proof,
    }
    _check_registration(fields)
    return frame(msgpack.packb(fields, use_bin_type=True))


def _unpack(data: bytes, keys: frozenset[str]) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE:
        raise RegistrationError(f"message of {len(data)} bytes over {MAX_MESSAGE}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, **_LIMITS)
    except Exception as exc:
        raise RegistrationError(
            f"undecodable registration message: {exc or type(exc).__name__}"
        ) from exc
    if type(obj) is not dict or obj.get("magic") != MAGIC:
        raise RegistrationError("not a dispynb registration message")
    if obj.keys() != keys:
        raise RegistrationError(
            f"registration message keys {sorted(map(str, obj))}, expected "
            f"{sorted(keys)}"
        )
    _int(obj, "version", 0, 0xFFFF)
    return obj


def decode_challenge(data: bytes) -> Challenge:
    """The challenge in ``data`` (a frame's payload)."""
    obj = _unpack(data, _CHALLENGE_KEYS)
    if type(obj["nonce"]) is not bytes or len(obj["nonce"]) != NONCE_SIZE:
        raise RegistrationError(f"challenge nonce must have {NONCE_SIZE} bytes")
    return Challenge(nonce=obj["nonce"], version=obj["version"])


def decode_registration(data: bytes) -> Registration:
    """The registration in ``data`` (a frame's payload); its proof is not checked."""
    obj = _unpack(data, _REGISTRATION_KEYS)
    _check_registration(obj)
    return Registration(
        name=obj["name"],
        port=obj["port"],
        cpus=obj["cpus"],
        boot=obj["boot"],
        proof=obj["proof"],
        version=obj["version"],
    )


def _check_registration(obj: dict[str, Any]) -> None:
    _int(obj, "version", 0, 0xFFFF)
    _int(obj, "port", 1, 0xFFFF)
    _int(obj, "cpus", 1, 0xFFFF)
    name = obj["name"]
    if type(name) is not str or not name or not name.isprintable():
        raise RegistrationError("registration name must be a non-empty printable str")
    if len(name.encode()) > MAX_NAME:
        raise RegistrationError(f"registration name over {MAX_NAME} bytes")
    if type(obj["boot"]) is not bytes or len(obj["boot"]) != BOOT_SIZE:
        raise RegistrationError(f"registration boot id must have {BOOT_SIZE} bytes")
    proof = obj["proof"]
    if type(proof) is not bytes or len(proof) not in (0, PROOF_SIZE):
        raise RegistrationError(f"registration proof must have {PROOF_SIZE} bytes")


def _int(obj: dict[str, Any], key: str, low: int, high: int) -> None:
    value = obj[key]
    if type(value) is not int or not low <= value <= high:
        raise RegistrationError(f"field {key!r} must be an int in {low}..{high}")
