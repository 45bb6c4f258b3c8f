"""Tests of the sans-IO handshake: the client and node objects talking to each other."""

from __future__ import annotations

import dataclasses

import pytest

from dispynb.errors import AuthenticationError, MessageError, ProtocolVersionError
from dispynb.protocol import auth
from dispynb.protocol.handshake import (
    ClientHandshake,
    NodeHandshake,
    error_to_exception,
    refusal,
)
from dispynb.protocol.messages import (
    PROTOCOL_VERSION,
    Auth,
    Challenge,
    Error,
    WireMessage,
    pack_header,
    unpack_header,
)

SECRET = b"s3cret-for-tests"
OTHER = PROTOCOL_VERSION + 1


def wire(message: WireMessage) -> WireMessage:
    """What the peer decodes: through msgpack, with pre-auth limits."""
    return WireMessage.from_header(
        unpack_header(pack_header(message.to_header()), trusted=False)
    )


def test_handshake_same_secret_succeeds_with_matching_keys():
    client, node = ClientHandshake(SECRET, name="me"), NodeHandshake(SECRET)
    challenge = node.on_hello(wire(client.hello()))
    node.on_auth(wire(client.on_challenge(wire(challenge))))
    client_send, client_receive = client.keys()
    node_send, node_receive = node.keys()
    assert client_send == node_receive
    assert client_receive == node_send
    assert client_send != client_receive
    assert node.client_name == "me"


def test_handshake_both_without_secret_succeeds():
    client, node = ClientHandshake(None), NodeHandshake(None)
    node.on_auth(client.on_challenge(node.on_hello(client.hello())))
    assert client.keys() == node.keys()[::-1]


def test_handshake_keys_differ_per_connection():
    keys = []
    for _ in range(2):
        client, node = ClientHandshake(SECRET), NodeHandshake(SECRET)
        node.on_auth(client.on_challenge(node.on_hello(client.hello())))
        keys.append(client.keys())
    assert set(keys[0]).isdisjoint(keys[1])


def test_hello_carries_version_role_and_fresh_nonce():
    one, two = ClientHandshake(SECRET).hello(), ClientHandshake(SECRET).hello()
    assert one.version == PROTOCOL_VERSION
    assert one.role == "client"
    assert len(one.nonce) == auth.NONCE_SIZE
    assert one.nonce != two.nonce


@pytest.mark.parametrize("client_secret", [b"wrong", None])
def test_handshake_wrong_secret_detected_by_client(client_secret):
    client, node = ClientHandshake(client_secret), NodeHandshake(SECRET)
    challenge = node.on_hello(client.hello())
    with pytest.raises(AuthenticationError, match="secret") as info:
        client.on_challenge(challenge)
    assert SECRET.decode() not in str(info.value)


def test_handshake_node_without_secret_detected_by_client():
    client, node = ClientHandshake(SECRET), NodeHandshake(None)
    with pytest.raises(AuthenticationError):
        client.on_challenge(node.on_hello(client.hello()))


def test_handshake_wrong_secret_with_forged_challenge_detected_by_node():
    wrong = b"attacker's guess"
    client, node = ClientHandshake(wrong), NodeHandshake(SECRET)
    hello = client.hello()
    real = node.on_hello(hello)
    # An impostor in the middle re-signs the challenge with the client's secret,
    # so the client accepts it; its proof must still fail at the node.
    forged = dataclasses.replace(
        real,
        proof=auth.proof(wrong, "node", PROTOCOL_VERSION, hello.nonce, real.nonce),
    )
    answer = client.on_challenge(forged)
    with pytest.raises(AuthenticationError, match="proof is wrong"):
        node.on_auth(answer)


def test_node_reflected_proof_as_auth_rejected():
    client, node = ClientHandshake(SECRET), NodeHandshake(SECRET)
    challenge = node.on_hello(client.hello())
    with pytest.raises(AuthenticationError):
        node.on_auth(Auth(proof=challenge.proof))


@pytest.mark.parametrize("proof", [b"", b"x" * 31, b"x" * 33, b"\0" * 32])
def test_node_bad_auth_proof_rejected(proof):
    client, node = ClientHandshake(SECRET), NodeHandshake(SECRET)
    node.on_hello(client.hello())
    with pytest.raises(AuthenticationError):
        node.on_auth(Auth(proof=proof))


def test_node_auth_before_hello_rejected():
    client, node = ClientHandshake(SECRET), NodeHandshake(SECRET)
    other = NodeHandshake(SECRET)
    answer = client.on_challenge(other.on_hello(client.hello()))
    with pytest.raises(AuthenticationError):
        node.on_auth(answer)


def test_node_replayed_auth_from_other_handshake_rejected():
    client = ClientHandshake(SECRET)
    first = NodeHandshake(SECRET)
    hello = client.hello()
    answer = client.on_challenge(first.on_hello(hello))
    first.on_auth(answer)
    second = NodeHandshake(SECRET)  # a new node nonce: the captured proof is stale
    second.on_hello(hello)
    with pytest.raises(AuthenticationError):
        second.on_auth(answer)


def test_client_replayed_challenge_rejected():
    old_client, node = ClientHandshake(SECRET), NodeHandshake(SECRET)
    captured = node.on_hello(old_client.hello())
    with pytest.raises(AuthenticationError):
        ClientHandshake(SECRET).on_challenge(captured)


def test_node_newer_client_version_raises_with_both_versions():
    client, node = ClientHandshake(SECRET), NodeHandshake(SECRET)
    hello = dataclasses.replace(client.hello(), version=OTHER)
    with pytest.raises(ProtocolVersionError) as info:
        node.on_hello(hello)
    text = str(info.value)
    assert f"version {OTHER}" in text
    assert f"speaks {PROTOCOL_VERSION}" in text


def test_client_newer_node_version_raises_with_both_versions():
    client, node = ClientHandshake(SECRET), NodeHandshake(SECRET)
    challenge = dataclasses.replace(node.on_hello(client.hello()), version=OTHER)
    with pytest.raises(ProtocolVersionError) as info:
        client.on_challenge(challenge)
    text = str(info.value)
    assert f"version {OTHER}" in text
    assert f"speaks {PROTOCOL_VERSION}" in text


def test_client_version_refusal_from_node_raises_with_both_versions():
    client, node = ClientHandshake(SECRET), NodeHandshake(SECRET)
    hello = dataclasses.replace(client.hello(), version=OTHER)
    with pytest.raises(ProtocolVersionError) as info:
        node.on_hello(hello)
    error = wire(refusal(info.value))
    with pytest.raises(ProtocolVersionError) as got:
        client.on_challenge(error)
    assert f"version {OTHER}" in str(got.value)
    assert f"speaks {PROTOCOL_VERSION}" in str(got.value)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("auth", AuthenticationError),
        ("version", ProtocolVersionError),
        ("protocol", MessageError),
        ("anything-else", MessageError),
    ],
)
def test_error_to_exception_maps_code(code, kind):
    exc = error_to_exception(Error(code=code, message="the reason"))
    assert type(exc) is kind
    assert "the reason" in str(exc)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (AuthenticationError("a"), "auth"),
        (ProtocolVersionError("v"), "version"),
        (MessageError("m"), "protocol"),
    ],
)
def test_refusal_round_trips_to_same_exception_type(exc, code):
    error = refusal(exc)
    assert error.code == code
    assert type(error_to_exception(wire(error))) is type(exc)


def test_client_error_instead_of_challenge_raises_mapped_exception():
    client = ClientHandshake(SECRET)
    with pytest.raises(AuthenticationError, match="go away"):
        client.on_challenge(Error(code="auth", message="go away"))


def test_client_unexpected_message_instead_of_challenge_raises():
    client = ClientHandshake(SECRET)
    with pytest.raises(MessageError, match="expected 'challenge'"):
        client.on_challenge(Auth(proof=b"x" * 32))


def test_node_unexpected_message_instead_of_hello_raises():
    with pytest.raises(MessageError, match="expected 'hello'"):
        NodeHandshake(SECRET).on_hello(Auth(proof=b"x" * 32))


def test_node_error_instead_of_hello_raises_mapped_exception():
    with pytest.raises(AuthenticationError):
        NodeHandshake(SECRET).on_hello(Error(code="auth", message="x"))


@pytest.mark.parametrize(
    "change", [{"role": "node"}, {"nonce": b"short"}, {"nonce": b"x" * 4096}]
)
def test_node_malformed_hello_raises(change):
    hello = dataclasses.replace(ClientHandshake(SECRET).hello(), **change)
    with pytest.raises(MessageError, match="malformed hello"):
        NodeHandshake(SECRET).on_hello(hello)


@pytest.mark.parametrize("change", [{"role": "client"}, {"nonce": b"short"}])
def test_client_malformed_challenge_raises(change):
    client, node = ClientHandshake(SECRET), NodeHandshake(SECRET)
    challenge = dataclasses.replace(node.on_hello(client.hello()), **change)
    with pytest.raises(MessageError, match="malformed challenge"):
        client.on_challenge(challenge)


def test_client_reflected_hello_as_challenge_rejected():
    client = ClientHandshake(SECRET)
    hello = client.hello()
    reflected = Challenge(
        version=hello.version, role="client", nonce=hello.nonce, proof=b"x" * 32
    )
    with pytest.raises(MessageError):
        client.on_challenge(reflected)
