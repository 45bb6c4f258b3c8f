"""Attacks through a node's log and an authenticated session's messages."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import socket
import struct
import time
from typing import Any

import pytest

from dispynb import JobCluster
from dispynb.defaults import MAX_MESSAGE_SIZE, PULSE_RANGE
from dispynb.protocol import serialize
from dispynb.protocol.handshake import ClientHandshake
from dispynb.protocol.messages import (
    ComputationClose,
    ComputationFailed,
    ComputationReady,
    ComputationSetup,
    Error,
    JobResults,
    JobSubmit,
    NodeStatus,
)
from dispynb.transport.connector import connect
from dispynb.transport.links import SocketLink
from tests.hostile.tools import (
    WAIT,
    RawSession,
    attacker_socket,
    count_lines,
    limited_node,
    recv_unsigned,
    send_unsigned,
    wait_for,
)
from tests.transport.util import RawClient

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


#: Messages whose fields have the right type but hold the wrong things (a fuzzer of
#: authenticated messages found them: each ended its session with a TypeError,
#: logged as an ERROR with its traceback).
_MALFORMED_INSIDE: tuple[dict[str, object], ...] = (
    {"op": "file-release", "digests": [[1]]},
    {"op": "file-release", "digests": [b"x"]},
    {"op": "job-submit", "comp_id": 1, "jobs": [7]},
    {"op": "job-submit", "comp_id": 1, "jobs": [[1, 0, 1]], "limits": [[{}, 1, 1]]},
)


@pytest.mark.attack(
    id="malformed-inside",
    title="An authenticated client sends messages whose lists hold the wrong things "
    "(a digest that is a list, a job entry that is a number, a limit's key a map)",
    goal="each answered with an error saying what is malformed, then closed; no "
    "traceback in the node's log (was: a TypeError traceback, logged as an ERROR)",
)
def test_malformed_entries_are_answered_not_tracebacks(measure, tmp_path):
    answers = []
    with limited_node(tmp_path / "node") as node:
        for header in _MALFORMED_INSIDE:
            session = RawSession.open(node.port, node.secret)
            try:
                session.send_header(header, (b"arguments",))
                answers.append(session.recv())
            except ConnectionError as exc:
                answers.append(exc)
            finally:
                session.close()
        log = node.log_text()
    said = [a.message for a in answers if isinstance(a, Error)]
    measure(
        f"{len(said)} of {len(_MALFORMED_INSIDE)} answered ({said[0] if said else '-'}"
        f"); {log.count('Traceback')} tracebacks in the log"
    )
    assert len(said) == len(_MALFORMED_INSIDE)
    assert all("malformed" in text for text in said), said
    assert "Traceback" not in log and " ERROR " not in log


def _status_reports_in(port: int, secret: bytes, interval: float, window: float) -> int:
    """Set up a computation asking for a status report every ``interval`` s; count
    the reports the node sends in the ``window`` s after it is ready."""

    async def attack() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = RawClient(reader, writer)
        try:
            await client.handshake(secret)
            bundle = serialize.dumps({"func": abs, "setup": None, "setup_args": ()})
            setup = ComputationSetup(
                comp_id=1, name="pulse", workers=1, pulse_interval=interval
            )
            writer.write(client.signed_frame(setup, bundle))
            async with asyncio.timeout(20):
                while not isinstance((await client.receive())[0], ComputationReady):
                    pass
            reports = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(window):
                    while True:
                        message, _ = await client.receive()
                        reports += isinstance(message, NodeStatus)
            return reports
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 10)

    return asyncio.run(attack())


@pytest.mark.attack(
    id="pulse-flood",
    title="A client asking for the node's status every microsecond "
    "(ComputationSetup.pulse_interval 1e-6)",
    goal=f"at most one report per {PULSE_RANGE[0]} s, as JobCluster allows (was a "
    "node spinning a CPU, thousands of reports a second)",
)
def test_a_client_cannot_make_the_node_report_its_status_in_a_loop(measure, tmp_path):
    window = 2.0
    with limited_node(tmp_path / "node") as node:
        reports = _status_reports_in(node.port, node.secret.encode(), 1e-6, window)
    measure(f"{reports} status reports in {window} s")
    assert reports <= window / PULSE_RANGE[0] + 1


#: Setups a raw client may send that `JobCluster` never does: seconds that no
#: timer can use.
BAD_SECONDS = (
    {"setup_timeout": float("nan")},
    {"setup_timeout": float("inf")},
    {"keep_results": float("nan"), "recovery_id": "r" * 32},
    {"keep_results": -5.0, "recovery_id": "r" * 32},
    {"pulse_interval": float("inf")},
)


def _setups_answered(port: int, secret: bytes) -> list[Any]:
    """Send each of `BAD_SECONDS`, then a sound setup; the node's answers."""

    async def attack() -> list[Any]:
        conn, _ = await connect(
            "127.0.0.1", port, secret=secret, max_message_size=MAX_MESSAGE_SIZE
        )
        try:
            bundle = serialize.dumps({"func": abs, "setup": None, "setup_args": ()})
            fields: list[dict[str, Any]] = [*BAD_SECONDS, {}]
            for comp_id, extra in enumerate(fields, 1):
                setup = ComputationSetup(
                    comp_id=comp_id, name="nan", workers=1, **extra
                )
                conn.write(setup, bundle)
            answers: list[Any] = []
            async with asyncio.timeout(WAIT):
                while len(answers) < len(fields):
                    message, _ = await conn.recv()
                    if isinstance(message, ComputationFailed | ComputationReady):
                        answers.append(message)
            return answers
        finally:
            conn.close()

    return asyncio.run(attack())


@pytest.mark.attack(
    id="nan-seconds",
    title="A setup whose setup_timeout, keep_results or pulse_interval is NaN, "
    "infinite or negative (a timer no event loop can order)",
    goal="each refused, naming the field; the session goes on (was: accepted; a "
    "NaN timer breaks the order of the node's event loop timers, so that others, "
    "other clients' too, fire late)",
)
def test_seconds_no_timer_can_use_are_refused(measure, tmp_path):
    with limited_node(tmp_path / "node") as node:
        answers = _setups_answered(node.port, node.secret.encode())
    *refused, last = answers
    measure(
        f"{sum(isinstance(a, ComputationFailed) for a in refused)} of "
        f"{len(BAD_SECONDS)} refused ({refused[0].message!r}); then {last.op!r}"
    )
    assert [type(a) for a in refused] == [ComputationFailed] * len(BAD_SECONDS)
    for answer, fields in zip(refused, BAD_SECONDS, strict=True):
        name = next(iter(fields))
        assert f"field {name!r} is" in answer.message, answer.message
    assert isinstance(last, ComputationReady)


#: A client limit under `nodeserver.outbox.FIT_BELOW`: the node sends it one message
#: per result when a batch is larger than half of it.
SMALL_MESSAGES = 1 << 20


def _vanish_with_jobs_queued(port: int, secret: bytes, jobs: int) -> None:
    """Set up a computation of ``jobs`` jobs of a minute each on 2 workers, wait
    until the first ones run, then vanish (a reset, as the socket of a killed
    process with data unread gives)."""

    async def attack() -> None:
        conn, _ = await connect(
            "127.0.0.1", port, secret=secret, max_message_size=SMALL_MESSAGES
        )
        try:
            bundle = serialize.dumps(
                {"func": time.sleep, "setup": None, "cleanup": None, "setup_args": ()}
            )
            setup = ComputationSetup(
                comp_id=1, name="vanish", workers=2, max_message_size=SMALL_MESSAGES
            )
            conn.write(setup, list(bundle))
            payload = serialize.dumps(((60,), {}))
            entries = [[key, 1, len(payload)] for key in range(jobs)]
            async with asyncio.timeout(WAIT):
                while not isinstance((await conn.recv())[0], ComputationReady):
                    pass
                conn.write(JobSubmit(comp_id=1, jobs=entries), payload * jobs)
                while True:  # until the node reports its first jobs started
                    message, _ = await conn.recv()
                    if isinstance(message, JobResults) and message.started:
                        break
        finally:
            link = conn._link
            assert isinstance(link, SocketLink)
            link._sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            conn.close()

    asyncio.run(attack())


@pytest.mark.attack(
    id="vanishing-client-log",
    title="A client vanishes (connection reset) with 4,000 jobs queued on a node, "
    "having asked for messages of 1 MiB at most (one message per result)",
    goal="one log line for the results the node cannot send, and one with their "
    "count when the session ends (was a line per message: 3,998)",
)
def test_a_vanished_client_costs_the_node_log_two_lines(measure, tmp_path):
    jobs = 4000
    with limited_node(tmp_path / "node", cpus=2) as node:
        _vanish_with_jobs_queued(node.port, node.secret.encode(), jobs)
        wait_for(lambda: "disconnected" in node.log_text(), "the session's end")
        log = node.log_text()
    lines = count_lines(node.log, "cannot send|not sent")
    counted = re.search(r"(\d+) more messages? to \S+ not sent", log)
    told = int(counted.group(1)) + 1 if counted else 0
    measure(
        f"{lines} log lines about the results not sent; the messages not sent "
        f"counted in them: {told}"
    )
    assert lines <= 2
    assert told >= 0.9 * jobs  # a message per result (or two: the running jobs')


def _named(name: str) -> Any:
    """A job function whose name (its computation's) is ``name``."""

    def job(x: int) -> int:
        return x * x

    job.__name__ = job.__qualname__ = name
    return job


@pytest.mark.attack(
    id="node-computation-name",
    title="A computation named with a line break, a forged log line, a terminal "
    "escape and 100,000 more characters (as a shared scheduler's user names hers, "
    "and the scheduler passes it on to its nodes)",
    goal="no forged line in the node's log, no escape, no line of 100 kB; the name "
    "logged escaped and cut (was: all three, in every line naming it)",
)
def test_a_computation_name_cannot_forge_node_log_lines(measure, tmp_path):
    name = f"x\n{FORGED}\x1b[2J" + "y" * 100_000
    with (
        limited_node(tmp_path / "node") as node,
        JobCluster(_named(name), nodes=[node.spec], secret=node.secret) as cluster,
    ):
        assert cluster.submit(3)() == 9
    log = node.log_text()
    forged = [line for line in log.splitlines() if line.startswith(FORGED)]
    longest = max(len(line) for line in log.splitlines())
    measure(
        f"{len(forged)} forged lines, {log.count(chr(27))} escapes, longest line "
        f"{longest} characters; {log.count('x' + chr(92) + 'n' + FORGED)} lines "
        "naming it escaped"
    )
    assert forged == [] and "\x1b" not in log and longest < 1000
