"""The handshake as pure state: version check and mutual challenge-response.

Sequence (all pre-auth messages are small, unsigned msgpack headers)::

    client                                   node
      Hello(version, "client", nonce_c) -->
                                   <--  Challenge(version, "node", nonce_n)
      Auth(proof_c)                     -->
                                   <--  Auth(proof_n), then Welcome (first signed
                                        message) | Error

The client proves first, and the node answers with its own proof only to a correct
one: an unauthenticated peer never gets anything computed from the secret, so it has
nothing to test guesses against offline (each guess costs it a connection, and the
node throttles failing sources). The client's proof does reach whatever listens where
the client connects, so clients send proofs to non-loopback nodes only for secrets
strong enough that an offline search is hopeless (see `dispynb.secret.check_strength`
and docs/security.md). A failure on the node side is answered with an `Error` message
before closing, so the client can say what went wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from dispynb.errors import (
    AuthenticationError,
    MessageError,
    NodeBusyError,
    NodeNotServingError,
    ProtocolVersionError,
    TransportError,
)
from dispynb.protocol import auth
from dispynb.protocol.messages import (
    NOT_SERVING,
    PROTOCOL_VERSION,
    Auth,
    Challenge,
    Error,
    Hello,
    WireMessage,
)

CLIENT = "client"
NODE = "node"

#: How a node (or scheduler) begins its refusal of a client's proof.
PROOF_REFUSED = "the client's proof is wrong"

#: The client name a health probe gives in its hello (``dispynb-node --check``,
#: ``dispynb-scheduler --check``): no user; a scheduler checks it against its node
#: secret.
HEALTH_PROBE = "<dispynb-node --check>"

#: How a node refuses a client's proof made with another secret (or none).
OTHER_SECRET = f"{PROOF_REFUSED}: it uses another secret than this node"

#: How a node without a secret refuses a client's proof made with one.
NODE_WITHOUT_SECRET = "it uses a secret and this node has none"

#: Characters of a peer's text (error message, name) kept in logs and errors.
PEER_TEXT_LIMIT = 200

_M = TypeVar("_M", bound=WireMessage)


def peer_text(text: object, limit: int = PEER_TEXT_LIMIT) -> str:
    """``text`` from a peer made safe for a log line or an error message.

    Control characters (newlines, escapes...) are shown escaped, as ``repr`` would,
    so a peer cannot forge log lines or terminal output; long text is cut.
    """
    value = str(text)
    if len(value) > limit:
        value = value[:limit] + f"... ({len(value) - limit} more characters)"
    if value.isprintable():
        return value
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in value)


def _expect(message: WireMessage, kind: type[_M]) -> _M:
    if isinstance(message, Error):
        raise error_to_exception(message)
    if not isinstance(message, kind):
        raise MessageError(f"expected {kind.op!r} during handshake, got {message.op!r}")
    return message


#: How a refusal for want of TLS begins (the server's reason follows).
TLS_REFUSED = "the node uses TLS, this client does not"


def error_to_exception(
    error: Error,
) -> (
    AuthenticationError
    | ProtocolVersionError
    | MessageError
    | NodeBusyError
    | NodeNotServingError
    | TransportError
):
    """The local exception for an `Error` the peer sent (its text made safe)."""
    text = peer_text(error.message)
    if error.code == "auth":
        return AuthenticationError(text)
    if error.code == "version":
        return ProtocolVersionError(text)
    if error.code == "busy":
        return NodeBusyError(f"node refused the connection for now: {text}")
    if error.code == NOT_SERVING:
        return NodeNotServingError(text)
    if error.code == "tls":
        return TransportError(f"{TLS_REFUSED}: {text}")
    return MessageError(f"peer refused the connection: {text}")


def _wrong_node_proof() -> AuthenticationError:
    return AuthenticationError(
        "the node does not know our shared secret (or uses another one): "
        "give both sides the same secret (secret= or secret_file=, DISPYNB_SECRET "
        "or DISPYNB_SECRET_FILE)"
    )


class ClientHandshake:
    """Client side of the handshake; feed it the node's replies in order."""

    def __init__(self, secret: bytes | None, name: str = "", user: str = "") -> None:
        self._secret = secret or b""
        self._name = name
        self._user = user  # set when the secret is a scheduler user's credential
        self._nonce = auth.new_nonce()
        self._node_nonce = b""
        self._node_verified = False

    def hello(self) -> Hello:
        """The opening message."""
        return Hello(
            version=PROTOCOL_VERSION, role=CLIENT, nonce=self._nonce, name=self._name
        )

    def on_challenge(self, message: WireMessage) -> Auth:
        """Take the node's nonce; return our proof."""
        if self._node_nonce:
            raise MessageError("a second challenge from node")
        challenge = _expect(message, Challenge)
        if challenge.version != PROTOCOL_VERSION:
            raise ProtocolVersionError(
                f"node speaks protocol version {peer_text(challenge.version)}, this "
                f"client speaks {PROTOCOL_VERSION}: install the same dispynb version "
                "on both"
            )
        if (
            challenge.role != NODE
            or len(challenge.nonce) != auth.NONCE_SIZE
            or challenge.nonce == self._nonce
        ):
            raise MessageError("malformed challenge from node")
        self._node_nonce = challenge.nonce
        return Auth(
            proof=auth.proof(
                self._secret, CLIENT, PROTOCOL_VERSION, self._nonce, challenge.nonce
            )
        )

    def on_confirm(self, message: WireMessage) -> None:
        """Check the node's proof (its answer to ours)."""
        if not self._node_nonce or self._node_verified:
            raise MessageError("node's proof out of turn")
        if isinstance(message, Error) and message.code == "auth":
            refused = peer_text(message.message)
            if not self._secret and not self._user and refused == OTHER_SECRET:
                # The node cannot tell a proof without a secret from one with
                # another: "it uses another secret", of a client that has none.
                refused = f"{PROOF_REFUSED}: this client has no secret, the node has"
            raise AuthenticationError(f"{refused}; {self._refused_remedy(refused)}")
        confirm = _expect(message, Auth)
        expected = auth.proof(
            self._secret, NODE, PROTOCOL_VERSION, self._nonce, self._node_nonce
        )
        if not auth.check_proof(expected, confirm.proof):
            raise _wrong_node_proof()
        self._node_verified = True

    def _refused_remedy(self, refused: str) -> str:
        """How to fix a secret the node (or scheduler) refused (``refused``: the
        node's words)."""
        if self._user:
            return (
                f"use the credential file that 'dispynb-scheduler user add "
                f"{self._user}' wrote (secret_file=), and check that the user was "
                "not revoked"
            )
        if refused.endswith(NODE_WITHOUT_SECRET):
            return (
                "connect without a secret, or start the node with this one "
                "(DISPYNB_SECRET or --secret-file)"
            )
        if not self._secret:  # a shell without DISPYNB_SECRET, say
            return (
                "give it the secret the node was started with (secret= or "
                "secret_file=, DISPYNB_SECRET or DISPYNB_SECRET_FILE)"
            )
        return (
            "give this client the secret the node was started with (secret= or "
            "secret_file=, DISPYNB_SECRET or DISPYNB_SECRET_FILE)"
        )

    def keys(self) -> tuple[bytes, bytes]:
        """``(send_key, receive_key)`` for the client, once the node is verified."""
        if not self._node_verified:
            raise AuthenticationError("the node has not proved it knows the secret")
        c2n, n2c = auth.session_keys(
            self._secret, PROTOCOL_VERSION, self._nonce, self._node_nonce
        )
        return c2n, n2c


#: The node side's secret: one for every client, or a lookup by the client's name
#: (a shared scheduler's per-user credentials); a lookup's None refuses the name.
SecretSource = bytes | None | Callable[[str], bytes | None]


class NodeHandshake:
    """Node side of the handshake; raises on any failure (reply with `refusal`)."""

    def __init__(self, secret: SecretSource) -> None:
        self._lookup = secret if callable(secret) else None
        self._secret = b"" if callable(secret) else (secret or b"")
        self._nonce = auth.new_nonce()
        self._client_nonce = b""
        self._client_verified = False
        self.client_name = ""

    def on_hello(self, message: WireMessage) -> Challenge:
        """Check the client's version; answer with our nonce (and nothing else)."""
        if self._client_nonce:
            raise MessageError("a second hello from client")
        hello = _expect(message, Hello)
        if hello.version != PROTOCOL_VERSION:
            raise ProtocolVersionError(
                f"client speaks protocol version {peer_text(hello.version)}, this node "
                f"speaks {PROTOCOL_VERSION}: install the same dispynb version on both"
            )
        if (
            hello.role != CLIENT
            or len(hello.nonce) != auth.NONCE_SIZE
            or hello.nonce == self._nonce
        ):
            raise MessageError("malformed hello from client")
        self._client_nonce = hello.nonce
        self.client_name = peer_text(hello.name)
        if self._lookup is not None:
            # An unknown name gets a random secret: its proof fails like a wrong
            # one, so that a peer cannot tell which names exist.
            self._secret = self._lookup(hello.name) or auth.new_nonce() * 2
        return Challenge(version=PROTOCOL_VERSION, role=NODE, nonce=self._nonce)

    def on_auth(self, message: WireMessage) -> Auth:
        """Check the client's proof (`AuthenticationError` if wrong); return ours."""
        received = _expect(message, Auth)
        if not self._client_nonce or self._client_verified:
            raise AuthenticationError("the client's proof came out of turn")
        expected = auth.proof(
            self._secret, CLIENT, PROTOCOL_VERSION, self._client_nonce, self._nonce
        )
        if not auth.check_proof(expected, received.proof):
            if self._lookup is not None and self.client_name == HEALTH_PROBE:
                # no user: a monitoring check, which proves the node secret
                raise AuthenticationError(
                    f"{PROOF_REFUSED}: the health check (--check) does not use this "
                    "server's node secret"
                )
            if self._lookup is not None:  # the same words for unknown names
                raise AuthenticationError(
                    f"{PROOF_REFUSED}: it does not hold the credential this server "
                    f"has for user {self.client_name!r}"
                )
            if not self._secret:  # a node for its own user on loopback
                raise AuthenticationError(f"{PROOF_REFUSED}: {NODE_WITHOUT_SECRET}")
            raise AuthenticationError(OTHER_SECRET)
        self._client_verified = True
        return Auth(
            proof=auth.proof(
                self._secret, NODE, PROTOCOL_VERSION, self._client_nonce, self._nonce
            )
        )

    def keys(self) -> tuple[bytes, bytes]:
        """``(send_key, receive_key)`` for the node, once the client is verified."""
        if not self._client_verified:
            raise AuthenticationError("the client has not proved it knows the secret")
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
