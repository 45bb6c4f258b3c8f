"""HMAC-SHA256 authentication: handshake proofs, session keys and per-message MACs.

The shared secret never crosses the wire. During the handshake each side proves it
knows the secret with ``HMAC(secret, label | version | role | client_nonce |
node_nonce)``; binding the role stops a proof from being reflected back, binding both
nonces stops replays, binding the version stops downgrades. Both sides then derive one
key per direction and sign every message with ``HMAC(key, seq | frame)``, where ``seq``
counts messages in that direction, so a replayed, dropped or reordered message fails
its check.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

from dispynb.errors import AuthenticationError
from dispynb.protocol.framing import Buffer

MAC_SIZE = 32
NONCE_SIZE = 32
_LABEL = b"dispynb-auth-v1"


def new_nonce() -> bytes:
    """A fresh random nonce for one handshake."""
    return secrets.token_bytes(NONCE_SIZE)


def _binding(*parts: bytes) -> bytes:
    # Length-prefix every part so no two different tuples give the same input.
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def proof(
    secret: bytes, role: str, version: int, client_nonce: bytes, node_nonce: bytes
) -> bytes:
    """The proof that the peer playing ``role`` knows ``secret`` in this handshake."""
    data = _binding(
        _LABEL,
        b"proof",
        role.encode(),
        str(version).encode(),
        client_nonce,
        node_nonce,
    )
    return hmac.digest(secret, data, "sha256")


def check_proof(expected: bytes, received: object) -> bool:
    """Compare proofs in constant time; anything that is not 32 bytes fails."""
    if not isinstance(received, bytes) or len(received) != MAC_SIZE:
        return False
    return hmac.compare_digest(expected, received)


def session_keys(
    secret: bytes, version: int, client_nonce: bytes, node_nonce: bytes
) -> tuple[bytes, bytes]:
    """Return ``(client_to_node, node_to_client)`` message keys for one connection."""
    keys = []
    for direction in (b"client->node", b"node->client"):
        data = _binding(
            _LABEL,
            b"session",
            direction,
            str(version).encode(),
            client_nonce,
            node_nonce,
        )
        keys.append(hmac.digest(secret, data, "sha256"))
    return keys[0], keys[1]


class MessageSigner:
    """Signs outgoing messages of one direction, numbering them from 0."""

    def __init__(self, key: bytes) -> None:
        self._template = hmac.new(key, digestmod=hashlib.sha256)
        self.seq = 0

    def start(self) -> hmac.HMAC:
        """Begin the MAC of the next message (it takes the next sequence number).

        Feed it the message's parts in order with ``update``; its ``digest()`` is the
        MAC. Lets a large message be hashed piece by piece, as it is sent.
        """
        mac = self._template.copy()
        mac.update(self.seq.to_bytes(8, "big"))
        self.seq += 1
        return mac

    def sign(self, parts: Iterable[Buffer]) -> bytes:
        """Return the MAC of the next message, made of ``parts`` in order."""
        mac = self.start()
        for part in parts:
            mac.update(part)
        return mac.digest()


class MessageVerifier:
    """Checks incoming messages of one direction; any gap or replay fails."""

    def __init__(self, key: bytes) -> None:
        self._signer = MessageSigner(key)

    @property
    def seq(self) -> int:
        """Sequence number the next message must carry."""
        return self._signer.seq

    def verify(self, parts: Iterable[Buffer], mac: Buffer) -> None:
        """Raise `AuthenticationError` unless ``mac`` signs ``parts`` as due next."""
        seq, running = self.start()
        for part in parts:
            running.update(part)
        self.check(seq, running, mac)

    def start(self) -> tuple[int, hmac.HMAC]:
        """Begin checking the next message: ``(seq, running_mac)``; feed it the parts
        with ``update`` (as they arrive), then call `check`."""
        seq = self._signer.seq
        return seq, self._signer.start()

    @staticmethod
    def check(seq: int, running: hmac.HMAC, mac: Buffer) -> None:
        """Raise `AuthenticationError` unless ``mac`` is the digest of ``running``."""
        if not hmac.compare_digest(running.digest(), bytes(mac)):
            raise AuthenticationError(
                f"message {seq} failed its MAC check: it was altered, replayed or "
                "reordered, or the peer uses another secret"
            )
