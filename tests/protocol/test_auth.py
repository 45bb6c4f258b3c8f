"""Tests of handshake proofs, session keys and per-message MACs."""

from __future__ import annotations

import pytest

from dispynb.errors import AuthenticationError
from dispynb.protocol import auth
from dispynb.protocol.auth import MessageSigner, MessageVerifier

SECRET = b"correct horse battery staple"
C_NONCE = b"c" * auth.NONCE_SIZE
N_NONCE = b"n" * auth.NONCE_SIZE


def make_proof(**changes) -> bytes:
    args = {
        "secret": SECRET,
        "role": "client",
        "version": 1,
        "client_nonce": C_NONCE,
        "node_nonce": N_NONCE,
    }
    args.update(changes)
    return auth.proof(**args)


def test_new_nonce_is_random_and_sized():
    nonces = {auth.new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert all(len(n) == auth.NONCE_SIZE for n in nonces)


def test_proof_same_inputs_is_deterministic():
    assert make_proof() == make_proof()
    assert len(make_proof()) == auth.MAC_SIZE


@pytest.mark.parametrize(
    "change",
    [
        {"secret": b"another secret"},
        {"role": "node"},
        {"version": 2},
        {"client_nonce": b"C" * auth.NONCE_SIZE},
        {"node_nonce": b"N" * auth.NONCE_SIZE},
    ],
)
def test_proof_any_input_changed_differs(change):
    assert make_proof(**change) != make_proof()


def test_proof_nonces_swapped_differs():
    swapped = make_proof(client_nonce=N_NONCE, node_nonce=C_NONCE)
    assert swapped != make_proof()


def test_proof_node_proof_is_never_a_valid_client_proof():
    node_proof = make_proof(role="node")
    assert not auth.check_proof(make_proof(role="client"), node_proof)


def test_proof_parts_are_length_prefixed_no_concatenation_collision():
    # "ab" + "c" and "a" + "bc" would collide without length prefixes.
    one = auth.proof(SECRET, "client", 1, b"ab", b"c")
    two = auth.proof(SECRET, "client", 1, b"a", b"bc")
    assert one != two


def test_check_proof_equal_passes():
    assert auth.check_proof(make_proof(), make_proof())


@pytest.mark.parametrize(
    "received",
    [
        b"",
        b"x" * 31,
        b"x" * 33,
        None,
        "x" * 32,
        bytearray(32),
        memoryview(bytes(32)),
        32,
    ],
)
def test_check_proof_wrong_length_or_type_fails(received):
    assert not auth.check_proof(bytes(32), received)


def test_check_proof_one_flipped_bit_fails():
    good = make_proof()
    bad = bytes([good[0] ^ 1]) + good[1:]
    assert not auth.check_proof(good, bad)


def test_session_keys_differ_per_direction():
    c2n, n2c = auth.session_keys(SECRET, 1, C_NONCE, N_NONCE)
    assert c2n != n2c
    assert len(c2n) == len(n2c) == 32


def test_session_keys_differ_from_proofs_and_per_connection():
    keys = auth.session_keys(SECRET, 1, C_NONCE, N_NONCE)
    other = auth.session_keys(SECRET, 1, C_NONCE, b"m" * auth.NONCE_SIZE)
    assert set(keys).isdisjoint(other)
    assert make_proof() not in keys
    assert make_proof(role="node") not in keys


def pair() -> tuple[MessageSigner, MessageVerifier]:
    c2n, _ = auth.session_keys(SECRET, 1, C_NONCE, N_NONCE)
    return MessageSigner(c2n), MessageVerifier(c2n)


MESSAGES = [[b"head-0", b"body-0"], [b"head-1"], [b"head-2", memoryview(b"x" * 100)]]


def test_verifier_messages_in_order_pass():
    signer, verifier = pair()
    for parts in MESSAGES:
        verifier.verify(parts, signer.sign(parts))
    assert signer.seq == verifier.seq == len(MESSAGES)


def test_verifier_same_bytes_split_differently_pass():
    signer, verifier = pair()
    verifier.verify([b"ab", b"cd"], signer.sign([b"a", b"bcd"]))


def test_verifier_replayed_message_fails_second_time():
    signer, verifier = pair()
    parts = MESSAGES[0]
    mac = signer.sign(parts)
    verifier.verify(parts, mac)
    with pytest.raises(AuthenticationError, match="message 1 failed"):
        verifier.verify(parts, mac)


def test_verifier_reordered_messages_fail():
    signer, verifier = pair()
    macs = [signer.sign(parts) for parts in MESSAGES[:2]]
    with pytest.raises(AuthenticationError):
        verifier.verify(MESSAGES[1], macs[1])


def test_verifier_dropped_message_fails():
    signer, verifier = pair()
    signer.sign(MESSAGES[0])
    mac = signer.sign(MESSAGES[1])
    with pytest.raises(AuthenticationError):
        verifier.verify(MESSAGES[1], mac)


@pytest.mark.parametrize("where", ["data", "mac"])
def test_verifier_flipped_bit_fails(where):
    signer, verifier = pair()
    data = bytearray(b"some message")
    mac = bytearray(signer.sign([bytes(data)]))
    target = data if where == "data" else mac
    target[3] ^= 0x10
    with pytest.raises(AuthenticationError):
        verifier.verify([bytes(data)], mac)


def test_verifier_mac_from_other_direction_key_fails():
    c2n, n2c = auth.session_keys(SECRET, 1, C_NONCE, N_NONCE)
    node_signer = MessageSigner(n2c)
    node_verifier = MessageVerifier(c2n)
    parts = [b"welcome"]
    with pytest.raises(AuthenticationError):
        node_verifier.verify(parts, node_signer.sign(parts))


@pytest.mark.parametrize("mac", [b"", b"x" * 31, b"x" * 64])
def test_verifier_mac_of_wrong_length_fails(mac):
    _, verifier = pair()
    with pytest.raises(AuthenticationError):
        verifier.verify([b"data"], mac)


def test_verifier_error_message_never_contains_key():
    c2n, _ = auth.session_keys(SECRET, 1, C_NONCE, N_NONCE)
    verifier = MessageVerifier(c2n)
    with pytest.raises(AuthenticationError) as info:
        verifier.verify([b"data"], bytes(32))
    text = str(info.value)
    assert c2n.hex() not in text
    assert SECRET.decode() not in text


# -- large messages: GMAC under a per-direction key, nonce = seq --------------------

LARGE = auth.LARGE_MESSAGE
KEY = b"k" * 32


def large(fill: int = 7, extra: int = 0) -> bytearray:
    return bytearray([fill]) * (LARGE + extra)


def test_large_messages_verify_and_take_their_turn_with_small_ones():
    signer, verifier = pair()
    messages = [[b"small"], [b"head", large()], [b"x"], [large(1, 12345)]]
    macs = [signer.sign(parts) for parts in messages]
    for parts, mac in zip(messages, macs, strict=True):
        verifier.verify(parts, mac)
    assert verifier.seq == 4


def test_large_mac_is_not_the_hmac_of_the_same_bytes():
    # Below the threshold the MAC is HMAC-SHA256 of seq | bytes: a large message's
    # MAC must differ from that, so both sides agree on the algorithm by size.
    body = large()
    assert MessageSigner(KEY).sign([body]) != _hmac_only(body)


def _hmac_only(body: bytes) -> bytes:
    import hashlib
    import hmac

    mac = hmac.new(KEY, digestmod=hashlib.sha256)
    mac.update((0).to_bytes(8, "big"))
    mac.update(body)
    return mac.digest()


def test_large_same_content_gets_a_new_one_time_key_per_message():
    signer = MessageSigner(KEY)
    body = large()
    assert signer.sign([body]) != signer.sign([body])


@pytest.mark.parametrize("where", [0, LARGE // 2, LARGE - 1])
def test_large_flipped_bit_fails(where):
    signer, verifier = pair()
    body = large()
    mac = signer.sign([body])
    body[where] ^= 0x01
    with pytest.raises(AuthenticationError, match="message 0 failed"):
        verifier.verify([body], mac)


def test_large_truncated_or_extended_fails():
    signer, verifier = pair()
    body = large(extra=10)
    mac = signer.sign([body])
    with pytest.raises(AuthenticationError):
        verifier.verify([body[:-1]], mac)
    signer, verifier = pair()
    mac = signer.sign([body])
    with pytest.raises(AuthenticationError):
        verifier.verify([body + b"\0"], mac)


def test_large_pieces_fed_as_they_arrive_match_the_whole():
    signer, verifier = pair()
    body = large(3, 99)
    mac = signer.sign([b"prefix", body])
    seq, running = verifier.start(len(b"prefix") + len(body))
    running.update(b"prefix")
    view = memoryview(body)
    for start in range(0, len(body), 5000):
        running.update(view[start : start + 5000])
    MessageVerifier.check(seq, running, mac)


def test_large_pieces_over_the_gmac_stride_are_split_the_same(monkeypatch):
    # OpenSSL takes a call's length as an int: pieces over 1 GiB are fed in strides.
    # A small stride stands in for it; the MAC must not depend on the split.
    body = large(5, 777)
    whole = MessageSigner(KEY).sign([body])
    monkeypatch.setattr(auth, "_GMAC_STRIDE", 1000)
    assert MessageSigner(KEY).sign([body]) == whole
    words = large(6, 780)  # a multiple of 4 bytes: a view of 32-bit items
    assert MessageSigner(KEY).sign([memoryview(words).cast("I")]) == (
        MessageSigner(KEY).sign([bytes(words)])
    )


def test_large_mac_from_the_other_direction_fails():
    client_to_node, node_to_client = auth.session_keys(KEY, 2, b"c" * 32, b"n" * 32)
    mac = MessageSigner(node_to_client).sign([large()])
    with pytest.raises(AuthenticationError):
        MessageVerifier(client_to_node).verify([large()], mac)


@pytest.mark.parametrize(("one", "other"), [(b"", b"\0"), (b"s", b"s\0\0")])
def test_secrets_differing_by_trailing_zero_bytes_are_different_keys(one, other):
    """HMAC pads short keys with zeros; the secret is hashed into the key instead."""
    nonces = (b"c" * 32, b"n" * 32)
    assert auth.proof(one, "client", 3, *nonces) != auth.proof(
        other, "client", 3, *nonces
    )
    assert auth.session_keys(one, 3, *nonces) != auth.session_keys(other, 3, *nonces)


@pytest.mark.parametrize("size", [0, 100, LARGE - 9, LARGE - 8, LARGE + 100])
def test_sign_frame_is_the_mac_of_head_then_rest_as_sign_gives_it(size):
    # One call for the usual small frame (HMAC), and `start`'s algorithm choice for
    # a large one: on either side of the threshold, the same MAC as `sign`.
    head, rest = b"p" * 8, bytes(range(256)) * (size // 256) + b"r" * (size % 256)
    whole = MessageSigner(KEY)
    split = MessageSigner(KEY)
    for _ in range(3):  # each takes its own sequence number
        assert split.sign_frame(head, memoryview(rest)) == whole.sign([head, rest])
    assert split.seq == whole.seq == 3


@pytest.mark.parametrize("size", [50, LARGE + 1])
def test_check_frame_passes_in_order_and_fails_replayed_or_altered(size):
    signer, verifier = pair()
    rest = bytearray(b"x" * size)
    first = signer.sign_frame(b"head", rest)
    second = signer.sign_frame(b"head", rest)
    verifier.check_frame(b"head", rest, first)
    with pytest.raises(AuthenticationError):
        verifier.check_frame(b"head", rest, first)  # replayed: the next is due
    signer, verifier = pair()
    mac = signer.sign_frame(b"head", rest)
    rest[-1] ^= 1
    with pytest.raises(AuthenticationError):
        verifier.check_frame(b"head", rest, mac)
    assert second != first
