"""Tests of the sans-IO handshake: the client and node objects talking to each other."""

from __future__ import annotations

import dataclasses

import pytest

from dispynb.errors import (
    AuthenticationError,
    MessageError,
    NodeBusyError,
    ProtocolVersionError,
)
from dispynb.protocol import auth
from dispynb.protocol.handshake import (
    ClientHandshake,
    NodeHandshake,
    error_to_exception,
    peer_text,
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


def exchange(client: ClientHandshake, node: NodeHandshake) -> None:
    """The whole handshake, every message through msgpack."""
    challenge = node.on_hello(wire(client.hello()))
    confirm = node.on_auth(wire(client.on_challenge(wire(challenge))))
    client.on_confirm(wire(confirm))


def test_handshake_same_secret_succeeds_with_matching_keys():
    client, node = ClientHandshake(SECRET, name="me"), NodeHandshake(SECRET)
    exchange(client, node)
    client_send, client_receive = client.keys()
    node_send, node_receive = node.keys()
    assert client_send == node_receive
    assert client_receive == node_send
    assert client_send != client_receive
    assert node.client_name == "me"


def test_handshake_both_without_secret_succeeds():
    client, node = ClientHandshake(None), NodeHandshake(None)
    exchange(client, node)
    assert client.keys() == node.keys()[::-1]


def test_handshake_keys_differ_per_connection():
    keys = []
    for _ in range(2):
        client, node = ClientHandshake(SECRET), NodeHandshake(SECRET)
        exchange(client, node)
        keys.append(client.keys())
    assert set(keys[0]).isdisjoint(keys[1])


def test_hello_carries_version_role_and_fresh_nonce():
    one, two = ClientHandshake(SECRET).hello(), ClientHandshake(SECRET).hello()
    assert one.version == PROTOCOL_VERSION
    assert one.role == "client"
    assert len(one.nonce) == auth.NONCE_SIZE
    assert one.nonce != two.nonce


def test_challenge_carries_nothing_computed_from_the_secret():
    """An unauthenticated client gets no verifier to test guesses against offline."""
    challenge = NodeHandshake(SECRET).on_hello(ClientHandshake(None).hello())
    assert set(challenge.to_header()) == {"op", "version", "role", "nonce"}


@pytest.mark.parametrize("client_secret", [b"wrong", None])
def test_handshake_wrong_secret_detected_by_node_which_never_proves(client_secret):
    client, node = ClientHandshake(client_secret), NodeHandshake(SECRET)
    answer = client.on_challenge(node.on_hello(client.hello()))
    with pytest.raises(AuthenticationError, match="proof is wrong") as info:
        node.on_auth(answer)
    assert SECRET.decode() not in str(info.value)
    with pytest.raises(AuthenticationError):
        node.keys()
    # The client is told why, in the node's words.
    with pytest.raises(AuthenticationError, match="proof is wrong"):
        client.on_confirm(wire(refusal(info.value)))


def test_a_refused_client_is_told_how_to_fix_its_secret():
    client, node = ClientHandshake(b"wrong"), NodeHandshake(SECRET)
    answer = client.on_challenge(node.on_hello(client.hello()))
    with pytest.raises(AuthenticationError) as info:
        node.on_auth(answer)
    with pytest.raises(AuthenticationError) as told:
        client.on_confirm(wire(refusal(info.value)))
    assert str(told.value).startswith(str(info.value))
    assert "the secret the node was started with" in str(told.value)
    assert "DISPYNB_SECRET" in str(told.value)


def test_a_refused_scheduler_user_is_pointed_at_the_credential_file():
    lookup = {"alice": SECRET}.get
    for user in ("alice", "ghost"):  # wrong credential, unknown user: same words
        client = ClientHandshake(b"stale", name=user, user=user)
        node = NodeHandshake(lookup)
        answer = client.on_challenge(node.on_hello(client.hello()))
        with pytest.raises(AuthenticationError) as info:
            node.on_auth(answer)
        assert str(info.value) == (
            "the client's proof is wrong: it does not hold the credential this "
            f"server has for user {user!r}"
        )
        with pytest.raises(AuthenticationError) as told:
            client.on_confirm(wire(refusal(info.value)))
        assert f"'dispynb-scheduler user add {user}' wrote" in str(told.value)


def test_impostor_node_without_the_secret_detected_by_client():
    client, impostor = ClientHandshake(SECRET), NodeHandshake(b"impostor's guess")
    hello = client.hello()
    challenge = impostor.on_hello(hello)
    client.on_challenge(challenge)
    # It cannot answer with a valid proof: it can only make one with its guess.
    forged = Auth(
        proof=auth.proof(
            b"impostor's guess", "node", PROTOCOL_VERSION, hello.nonce, challenge.nonce
        )
    )
    with pytest.raises(AuthenticationError, match="does not know our shared secret"):
        client.on_confirm(forged)
    with pytest.raises(AuthenticationError):
        client.keys()


def test_client_reflected_proof_as_node_proof_rejected():
    client, node = ClientHandshake(SECRET), NodeHandshake(SECRET)
    answer = client.on_challenge(node.on_hello(client.hello()))
    with pytest.raises(AuthenticationError):
        client.on_confirm(answer)  # a node echoing the client's own proof


def test_node_reflected_proof_as_auth_rejected():
    client, node = ClientHandshake(SECRET), NodeHandshake(SECRET)
    other_client, other_node = ClientHandshake(SECRET), NodeHandshake(SECRET)
    node.on_hello(client.hello())
    confirm = other_node.on_auth(
        other_client.on_challenge(other_node.on_hello(other_client.hello()))
    )
    with pytest.raises(AuthenticationError):
        node.on_auth(confirm)


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


def test_messages_out_of_turn_rejected():
    client, node = ClientHandshake(SECRET), NodeHandshake(SECRET)
    with pytest.raises(MessageError):
        client.on_confirm(Auth(proof=b"x" * 32))  # before the challenge
    hello = client.hello()
    challenge = node.on_hello(hello)
    with pytest.raises(MessageError, match="second hello"):
        node.on_hello(hello)
    answer = client.on_challenge(challenge)
    with pytest.raises(MessageError, match="second challenge"):
        client.on_challenge(challenge)
    confirm = node.on_auth(answer)
    with pytest.raises(AuthenticationError, match="out of turn"):
        node.on_auth(answer)
    client.on_confirm(confirm)
    with pytest.raises(MessageError, match="out of turn"):
        client.on_confirm(confirm)


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
        ("busy", NodeBusyError),
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


def test_peer_text_is_escaped_and_cut_in_exceptions():
    forged = "wrong\n2026-01-01 CRITICAL nodeserver: all good\x1b[2J" + "x" * 500
    text = str(error_to_exception(Error(code="protocol", message=forged)))
    assert "\n" not in text and "\x1b" not in text
    assert "wrong\\n2026-01-01" in text
    assert len(text) < 300 and "more characters" in text


def test_peer_text_keeps_printable_text_unchanged():
    assert peer_text("héllo wörld: 42") == "héllo wörld: 42"


def test_node_escapes_a_client_name_with_control_characters():
    node = NodeHandshake(SECRET)
    hello = dataclasses.replace(ClientHandshake(SECRET).hello(), name="a\nb\r")
    node.on_hello(hello)
    assert node.client_name == "a\\nb\\r"


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
    reflected = Challenge(version=hello.version, role="client", nonce=hello.nonce)
    with pytest.raises(MessageError):
        client.on_challenge(reflected)
    own_nonce = Challenge(version=hello.version, role="node", nonce=hello.nonce)
    with pytest.raises(MessageError):
        client.on_challenge(own_nonce)
