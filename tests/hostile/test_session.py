"""Attacks through a node's log and an authenticated session's messages."""

from __future__ import annotations

import dataclasses

import pytest

from dispynb.protocol.handshake import ClientHandshake
from dispynb.protocol.messages import ComputationClose, Error
from tests.hostile.tools import (
    RawSession,
    attacker_socket,
    limited_node,
    recv_unsigned,
    send_unsigned,
)

pytestmark = pytest.mark.slow

FORGED = "2026-01-01 00:00:00,000 nodeserver CRITICAL forged line"


@pytest.mark.attack(
    id="log-injection",
    title="Newlines and terminal escapes in a peer's error text or client name, "
    "before and after authentication",
    goal="no forged log line; the text is escaped in the log and in the refusal "
    "echoed back",
)
def test_peer_text_cannot_forge_log_lines(measure, tmp_path):
    with limited_node(tmp_path / "node") as node:
        replies = []
        # Before authentication: an error message instead of a hello...
        with attacker_socket(node.port) as sock:
            send_unsigned(sock, Error(code="x", message=f"oops\n{FORGED}\x1b[2J"))
            replies.append(recv_unsigned(sock))
        # ...and a hello whose client name carries a line, with a wrong secret...
        with attacker_socket(node.port) as sock:
            handshake = ClientHandshake(b"wrong")
            send_unsigned(
                sock, dataclasses.replace(handshake.hello(), name=f"me\n{FORGED}")
            )
            send_unsigned(sock, handshake.on_challenge(recv_unsigned(sock)))
            replies.append(recv_unsigned(sock))
        # ...and after authentication, with the right one.
        RawSession.open(node.port, node.secret, name=f"me\r\n{FORGED}").close()
    log = node.log_text()
    forged_lines = [line for line in log.splitlines() if line.startswith(FORGED)]
    echoed = [reply.message for reply in replies if isinstance(reply, Error)]
    raw_in_echo = sum(1 for text in echoed if "\n" in text or "\x1b" in text)
    escaped = log.count("\\n" + FORGED)
    measure(
        f"{len(forged_lines)} forged lines in the node log ({escaped} escaped "
        f"mentions); {raw_in_echo} of {len(echoed)} refusals echoed raw control "
        "characters"
    )
    assert forged_lines == [] and "\x1b" not in log
    assert raw_in_echo == 0 and len(echoed) == 2
    assert escaped >= 1


@pytest.mark.attack(
    id="unknown-op",
    title="An authenticated client sends messages the node does not know (unknown "
    "op, fields of the wrong type)",
    goal="answered with an error; the session and its other messages go on",
)
def test_unknown_op_is_answered_and_the_session_goes_on(measure, tmp_path):
    with limited_node(tmp_path / "node") as node:
        session = RawSession.open(node.port, node.secret)
        try:
            errors = []
            for header in (
                {"op": "no-such-op"},
                {"op": "job-cancel", "comp_id": "one", "key": 1, "attempt": 0},
                {"op": "x" * 10_000},
            ):
                session.send_header(header)
                errors.append(session.recv())
            session.send(ComputationClose(comp_id=12345))
            after = session.recv()
        finally:
            session.close()
    codes = [e.code for e in errors if isinstance(e, Error)]
    longest = max(len(e.message) for e in errors if isinstance(e, Error))
    measure(
        f"{len(codes)} of 3 bad messages answered with error {set(codes)} (longest "
        f"{longest} characters); the next message was answered with {after.op!r}"
    )
    assert codes == ["protocol"] * 3
    assert longest < 400
    assert not isinstance(after, Error) or "no-such-op" not in after.message
