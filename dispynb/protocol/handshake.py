"""The handshake as pure state: version check and mutual challenge-response.

Sequence (all pre-auth messages are small, unsigned msgpack headers)::

    client                                   node
      Hello(version, "client", nonce_c) -->
                                   <--  Challenge(version, "node", nonce_n, proof_n)
      checks proof_n; Auth(proof_c)     -->
                                   <--  Welcome (first signed message) | Error

The node proves itself first, so a client never hands its proof to an impostor. A
failure on the node side is answered with an `Error` message before closing, so the
client can say what went wrong.
"""

from __future__ import annotations

from typing import TypeVar

from dispynb.errors import AuthenticationError, MessageError, ProtocolVersionError
from dispynb.protocol import auth
from dispynb.protocol.messages import (
    PROTOCOL_VERSION,
    Auth,
    Challenge,
    Error,
    Hello,
    WireMessage,
)

CLIENT = "client"
NODE = "node"


_M = TypeVar("_M", bound=WireMessage)


def _expect(message: WireMessage, kind: type[_M]) -> _M:
    if isinstance(message, Error):
        raise error_to_exception(message)
    if not isinstance(message, kind):
        raise MessageError(f"expected {kind.op!r} during handshake, got {message.op!r}")
    return message


def error_to_exception(
    error: Error,
) -> AuthenticationError | ProtocolVersionError | MessageError:
    """The local exception for an `Error` the peer sent."""
    if error.code == "auth":
        return AuthenticationError(error.message)
    if error.code == "version":
        return ProtocolVersionError(error.message)
    return MessageError(f"peer refused the connection: {error.message}")


class ClientHandshake:
    """Client side of the handshake; feed it the node's replies in order."""

    def __init__(self, secret: bytes | None, name: str = "") -> None:
        self._secret = secret or b""
        self._name = name
        self._nonce = auth.new_nonce()
        self._node_nonce = b""

    def hello(self) -> Hello:
        """The opening message."""
        return Hello(
            version=PROTOCOL_VERSION, role=CLIENT, nonce=self._nonce, name=self._name
        )

    def on_challenge(self, message: WireMessage) -> Auth:
        """Check the node's proof; return our own."""
        challenge = _expect(message, Challenge)
        if challenge.version != PROTOCOL_VERSION:
            raise ProtocolVersionError(
                f"node speaks protocol version {challenge.version}, this client speaks "
                f"{PROTOCOL_VERSION}: install the same dispynb version on both"
            )
        if challenge.role != NODE or len(challenge.nonce) != auth.NONCE_SIZE:
            raise MessageError("malformed challenge from node")
        self._node_nonce = challenge.nonce
        expected = auth.proof(
            self._secret, NODE, PROTOCOL_VERSION, self._nonce, challenge.nonce
        )
        if not auth.check_proof(expected, challenge.proof):
            raise AuthenticationError(
                "the node does not know our shared secret (or uses another one): "
                "give both sides the same secret (secret=, DISPYNB_SECRET or "
                "DISPYNB_SECRET_FILE)"
            )
        return Auth(
            proof=auth.proof(
                self._secret, CLIENT, PROTOCOL_VERSION, self._nonce, challenge.nonce
            )
        )

    def keys(self) -> tuple[bytes, bytes]:
        """``(send_key, receive_key)`` for the client, once the challenge is checked."""
        c2n, n2c = auth.session_keys(
            self._secret, PROTOCOL_VERSION, self._nonce, self._node_nonce
        )
        return c2n, n2c


class NodeHandshake:
    """Node side of the handshake; raises on any failure (reply with `refusal`)."""

    def __init__(self, secret: bytes | None) -> None:
        self._secret = secret or b""
        self._nonce = auth.new_nonce()
        self._client_nonce = b""
        self.client_name = ""

    def on_hello(self, message: WireMessage) -> Challenge:
        """Check the client's version; answer with our nonce and proof."""
        hello = _expect(message, Hello)
        if hello.version != PROTOCOL_VERSION:
            raise ProtocolVersionError(
                f"client speaks protocol version {hello.version}, this node speaks "
                f"{PROTOCOL_VERSION}: install the same dispynb version on both"
            )
        if hello.role != CLIENT or len(hello.nonce) != auth.NONCE_SIZE:
            raise MessageError("malformed hello from client")
        self._client_nonce = hello.nonce
        self.client_name = hello.name
        return Challenge(
            version=PROTOCOL_VERSION,
            role=NODE,
            nonce=self._nonce,
            proof=auth.proof(
                self._secret, NODE, PROTOCOL_VERSION, hello.nonce, self._nonce
            ),
        )

    def on_auth(self, message: WireMessage) -> None:
        """Check the client's proof; raise `AuthenticationError` if it is wrong."""
        received = _expect(message, Auth)
        expected = auth.proof(
            self._secret, CLIENT, PROTOCOL_VERSION, self._client_nonce, self._nonce
        )
        if not self._client_nonce or not auth.check_proof(expected, received.proof):
            raise AuthenticationError(
                "the client's proof is wrong: it uses another secret than this node"
            )

    def keys(self) -> tuple[bytes, bytes]:
        """``(send_key, receive_key)`` for the node, once the client is verified."""
        c2n, n2c = auth.session_keys(
            self._secret, PROTOCOL_VERSION, self._client_nonce, self._nonce
        )
        return n2c, c2n


def refusal(exc: Exception) -> Error:
    """The `Error` message a node sends before closing a failed handshake."""
    if isinstance(exc, AuthenticationError):
        return Error(code="auth", message=str(exc))
    if isinstance(exc, ProtocolVersionError):
        return Error(code="version", message=str(exc))
    return Error(code="protocol", message=str(exc))
