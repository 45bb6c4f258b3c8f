"""`peer_uid`: the owner of a connection's other end, over every kind of socket a
node accepts (the other-user case: tests/hostile/test_no_secret.py)."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from dispynb.transport import peeruser
from dispynb.transport.peeruser import peer_uid

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="/proc/net/tcp is Linux's"
)


@pytest.mark.parametrize(
    ("family", "listen_on", "connect_to"),
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
        (socket.AF_INET6, "::1", "::1"),
        (socket.AF_INET6, "::", "127.0.0.1"),  # dual stack: an IPv4-mapped peer
        (socket.AF_INET6, "::", "::ffff:127.0.0.1"),  # ... an IPv6 socket's too
    ],
)
def test_a_loopback_peer_is_found_as_this_user(family, listen_on, connect_to):
    with socket.socket(family) as listening:
        listening.bind((listen_on, 0))
        listening.listen()
        port = listening.getsockname()[1]
        with socket.create_connection((connect_to, port)):
            accepted, _ = listening.accept()
            with accepted:
                assert peer_uid(accepted) == os.geteuid()  # by sock_diag
                peer = peeruser._address(accepted.getpeername())
                ours = peeruser._address(accepted.getsockname())
                # ... and where netlink is refused: /proc/net/tcp
                assert peeruser._table_uid(peer, ours) == os.geteuid()
                assert peeruser._diag_uid((peer[0], 1), ours) is None  # no such


def test_a_unix_peer_is_found_as_this_user():
    one, other = socket.socketpair()
    with one, other:
        assert peer_uid(one) == os.geteuid()


def test_a_peer_gone_is_unknown():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        client = socket.create_connection(listening.getsockname())
        accepted, _ = listening.accept()
        with accepted:
            client.close()
            accepted.close()
            assert peer_uid(accepted) is None
