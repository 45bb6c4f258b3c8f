"""Property-based tests (hypothesis) of what hostile peers feed first: the frame
decoder, the handshake state machines and the file-name checks."""

from __future__ import annotations

import contextlib
import itertools
import os
import posixpath
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispynb.errors import (
    AuthenticationError,
    DispynbError,
    FramingError,
    MessageError,
    ProtocolError,
)
from dispynb.protocol import auth
from dispynb.protocol.files import safe_relative_path, write_inside
from dispynb.protocol.framing import PREFIX, PREFIX_SIZE, FrameDecoder, encode_frames
from dispynb.protocol.handshake import ClientHandshake, NodeHandshake
from dispynb.protocol.messages import (
    PROTOCOL_VERSION,
    Auth,
    Challenge,
    Error,
    Hello,
    WireMessage,
    unpack_header,
)

CAP = 64 * 1024
# Shared, busy CPUs: no per-example deadline; the example counts bound the time.
SETTINGS = settings(deadline=None, max_examples=200)

buffers_st = st.lists(st.binary(max_size=300), min_size=1, max_size=5)


def encoded(frames: list[list[bytes]]) -> bytes:
    out = []
    for buffers in frames:
        head, parts = encode_frames(buffers)
        out += [head, *parts]
    return b"".join(out)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# --- the frame decoder ---------------------------------------------------------------


@SETTINGS
@given(st.lists(buffers_st, max_size=6), st.lists(st.integers(0, 10**6), max_size=20))
def test_decoder_returns_what_was_encoded_in_any_chunking(frames, cuts):
    decoder = FrameDecoder(CAP, chunk=256)  # small chunk: big-frame path too
    out = []
    for piece in chunked(encoded(frames), cuts):
        out += decoder.feed(piece)
    assert [[bytes(b) for b in buffers] for _, buffers, _, _ in out] == frames
    assert decoder.pending == 0


@SETTINGS
@given(st.binary(max_size=4096), st.lists(st.integers(0, 4096), max_size=10))
def test_decoder_on_any_bytes_yields_frames_or_a_framing_error(data, cuts):
    decoder = FrameDecoder(CAP, chunk=512)
    got = 0
    try:
        for piece in chunked(data, cuts):
            for prefix, buffers, _signed, _mac in decoder.feed(piece):
                got += len(prefix) + sum(len(b) for b in buffers)
    except FramingError:
        assert decoder.error is not None
    assert got <= len(data)
    # Never more allocated than the cap allows, whatever was announced.
    assert decoder.expected <= CAP + PREFIX_SIZE or decoder.error is not None


@SETTINGS
@given(st.integers(CAP + 1, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_decoder_refuses_an_oversized_prefix_on_the_prefix_alone(size, count):
    decoder = FrameDecoder(CAP)
    with pytest.raises(FramingError):
        decoder.feed(PREFIX.pack(size, count))
    assert decoder.pending <= PREFIX_SIZE


@SETTINGS
@given(st.binary(max_size=2048))
def test_pre_auth_header_decoding_raises_only_message_errors(data):
    with contextlib.suppress(MessageError):
        WireMessage.from_header(unpack_header(data, trusted=False))


# --- the handshake state machines ----------------------------------------------------

secrets_st = st.one_of(st.none(), st.binary(min_size=1, max_size=64))


@SETTINGS
@given(secrets_st, secrets_st, st.text(max_size=50))
def test_handshake_succeeds_exactly_when_the_secrets_match(
    client_secret, node_secret, name
):
    client, node = ClientHandshake(client_secret, name), NodeHandshake(node_secret)
    challenge = node.on_hello(client.hello())
    answer = client.on_challenge(challenge)
    if (client_secret or b"") != (node_secret or b""):
        with pytest.raises(AuthenticationError):
            node.on_auth(answer)
        with pytest.raises(AuthenticationError):
            node.keys()
        return
    client.on_confirm(node.on_auth(answer))
    assert client.keys() == node.keys()[::-1]


ACTIONS = ["hello", "hello-again", "bad-hello", "auth-right", "auth-random",
           "auth-reflected", "challenge", "error", "keys"]  # fmt: skip


@SETTINGS
@given(
    st.lists(st.sampled_from(ACTIONS), max_size=8), st.binary(min_size=32, max_size=32)
)
def test_node_proves_itself_only_after_a_right_proof(actions, random_proof):
    """Any sequence of messages: the node sends its proof (or gives keys) only once it
    got a hello and then the right proof for it; everything else raises a protocol
    error, after which the connection is dropped (the run stops)."""
    secret = b"property-secret"
    node, client = NodeHandshake(secret), ClientHandshake(secret)
    hello = client.hello()
    challenge: Challenge | None = None
    verified = expect_verified = False
    for action in actions:
        try:
            if action in ("hello", "hello-again"):
                got = node.on_hello(hello)
                assert challenge is None  # a second hello never passes
                challenge = got
                assert set(got.to_header()) == {"op", "version", "role", "nonce"}
            elif action == "bad-hello":
                node.on_hello(Hello(version=PROTOCOL_VERSION, role="node", nonce=b"x"))
                raise AssertionError("a malformed hello passed")
            elif action.startswith("auth"):
                if action == "auth-right" and challenge is not None:
                    expect_verified = True
                    proof = auth.proof(
                        secret, "client", PROTOCOL_VERSION, hello.nonce, challenge.nonce
                    )
                elif action == "auth-reflected" and challenge is not None:
                    proof = auth.proof(
                        secret, "node", PROTOCOL_VERSION, hello.nonce, challenge.nonce
                    )
                else:
                    proof = random_proof
                confirm = node.on_auth(Auth(proof=proof))
                assert action == "auth-right" and challenge is not None and not verified
                assert isinstance(confirm, Auth)
                verified = True
            elif action == "challenge":
                node.on_hello(
                    Challenge(version=PROTOCOL_VERSION, role="node", nonce=b"n")
                )
                raise AssertionError("a challenge passed as a hello")
            elif action == "error":
                node.on_hello(Error(code="auth", message="x"))
                raise AssertionError("an error passed as a hello")
            else:
                keys = node.keys()
                assert verified and len(keys) == 2
        except AssertionError:
            raise
        except DispynbError:
            return  # the transport closes the connection here
    # No protocol error ended the run: a right proof, if sent in turn, was accepted.
    assert verified == expect_verified


CLIENT_ACTIONS = ["challenge", "confirm-right", "confirm-random",
                  "confirm-reflected", "error", "keys"]  # fmt: skip


@SETTINGS
@given(st.lists(st.sampled_from(CLIENT_ACTIONS), max_size=6))
def test_client_accepts_the_node_only_after_its_right_proof(actions):
    secret = b"property-secret"
    client, node = ClientHandshake(secret), NodeHandshake(secret)
    hello = client.hello()
    challenge = node.on_hello(hello)
    answer: Auth | None = None
    verified = False
    for action in actions:
        try:
            if action == "challenge":
                answer = client.on_challenge(challenge)
            elif action.startswith("confirm"):
                if action == "confirm-right":
                    proof = auth.proof(
                        secret, "node", PROTOCOL_VERSION, hello.nonce, challenge.nonce
                    )
                elif action == "confirm-reflected" and answer is not None:
                    proof = answer.proof
                else:
                    proof = os.urandom(32)
                client.on_confirm(Auth(proof=proof))
                assert action == "confirm-right" and answer is not None and not verified
                verified = True
            elif action == "error":
                client.on_confirm(Error(code="auth", message="no"))
                raise AssertionError("an error passed as a proof")
            else:
                client.keys()
                assert verified
        except AssertionError:
            raise
        except DispynbError:
            return


# --- file names ----------------------------------------------------------------------

names_st = st.one_of(
    st.text(max_size=80),
    st.lists(
        st.sampled_from(["a", "b.txt", "..", ".", "", "/", "\\", "c:", "\0", "é", " "]),
        max_size=8,
    ).map("/".join),
)


@SETTINGS
@given(names_st)
def test_a_safe_name_never_leaves_its_directory(name):
    try:
        safe = safe_relative_path(name)
    except ProtocolError:
        return
    assert not safe.startswith("/") and "\\" not in safe and "\0" not in safe
    assert ".." not in safe.split("/")
    assert posixpath.normpath(safe) == safe
    assert posixpath.normpath(posixpath.join("/base", safe)).startswith("/base/")


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(names_st, min_size=1, max_size=4))
def test_files_written_by_any_names_stay_inside_the_base(names):
    with tempfile.TemporaryDirectory() as top:
        base = os.path.join(top, "base")
        os.mkdir(base)
        for name in names:
            try:
                path = write_inside(base, name, b"x")
            except (ProtocolError, OSError):
                continue
            assert os.path.realpath(path).startswith(os.path.realpath(base) + os.sep)
        outside = [entry for entry in os.listdir(top) if entry != "base"]
        assert outside == []
