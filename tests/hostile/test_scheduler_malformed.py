"""A scheduler user's messages whose fields hold the wrong things inside.

Found by a fuzzer of authenticated messages (field types right, contents wrong): a
job limit keyed by a map and a file entry whose size is a string ended the
session with a KeyError or a ValueError, logged by the scheduler as an ERROR with
its traceback; the user was told nothing.
"""

from __future__ import annotations

import asyncio
import pickle
import re
from pathlib import Path
from typing import Any

import pytest

from dispynb.protocol import serialize
from dispynb.protocol.messages import (
    ComputationClose,
    ComputationSetup,
    Error,
    FilesMissing,
    JobCancel,
    JobResults,
    JobSubmit,
    Message,
)
from dispynb.transport.connection import Connection
from tests.hostile.scripted import ScriptedNode, finished
from tests.hostile.test_scheduler import _alices_jobs, people, shared_nodes
from tests.sharedsched.harness import SchedulerProcess, raw_scheduler_session
from tests.transport.util import SECRET, serving_in_thread

pytestmark = pytest.mark.slow

__all__ = ["people"]  # the fixture

#: What mallory sends once her computation 1 is set up, with its buffers.
_MALFORMED: tuple[tuple[Message, list[bytes]], ...] = (
    (JobSubmit(comp_id=1, jobs=[[1, 0, 1]], limits=[[{}, 1, 1]]), [b"args"]),
    (JobSubmit(comp_id=1, jobs=[7]), []),  # type: ignore[list-item]
    (
        ComputationSetup(comp_id=2, name="m", workers=1, files=[["a", "0" * 64, "a"]]),
        [],
    ),
)


async def _send_malformed(port: int, credential: Path) -> list[Any]:
    """Set computation 1 up, send each of `_MALFORMED`; return what came back for
    each (then for a close of computation 1: the session went on)."""
    conn = await raw_scheduler_session(port, credential, max_message_size=1 << 24)
    try:
        bundle = serialize.dumps({"func": abs, "setup": None, "setup_args": ()})
        conn.write(ComputationSetup(comp_id=1, name="fz", workers=1), bundle)
        answers = []
        for message, buffers in (*_MALFORMED, (ComputationClose(comp_id=1), [])):
            try:
                conn.write(message, buffers)
                async with asyncio.timeout(10):
                    while True:
                        answer, _ = await conn.recv()
                        if answer.op not in ("computation-ready", "status"):
                            break
            except Exception as exc:  # what the user meets
                answer = exc
            answers.append(answer)
        return answers
    finally:
        conn.close()


@pytest.mark.attack(
    id="sched-malformed-inside",
    title="A scheduler user sends a job limit keyed by a map, a job entry that is a "
    "number, a file entry whose size is a string",
    goal="each refused with a message saying what is malformed; the session goes on; "
    "no traceback in the scheduler's log (was: KeyError, ValueError tracebacks "
    "logged as errors, the session ended)",
)
@pytest.mark.timeout(120)
def test_malformed_entries_are_refused_and_the_session_goes_on(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    with shared_nodes(tmp_path, people) as sched:
        answers = asyncio.run(_send_malformed(sched.port, people["mallory"]))
        alices = _alices_jobs(sched.address, people["alice"])
        log = sched.log_text()
    said = [getattr(a, "message", repr(a))[:80] for a in answers]
    measure(f"answers: {said}; {log.count('Traceback')} tracebacks; alice: {alices}")
    assert all("malformed" in text for text in said[:-1]), said
    assert not isinstance(answers[-1], Error | Exception), said  # the close's answer
    assert "Traceback" not in log and alices == [0, 1, 4, 9]


class _AsksByLists(ScriptedNode):
    """A node (holding the secret) that asks for a computation's files by a digest
    that is a list, then runs its jobs."""

    def setup(self, conn: Connection, message: ComputationSetup) -> None:
        conn.write(FilesMissing(comp_id=message.comp_id, digests=[[1]]))  # type: ignore[list-item]
        super().setup(conn, message)

    async def jobs(self, conn: Connection, message: JobSubmit) -> None:
        for key, attempt, *_rest in message.jobs:
            conn.write(
                JobResults(comp_id=message.comp_id, results=[finished(key, attempt)]),
                [pickle.dumps(key * key)],
            )


@pytest.mark.attack(
    id="sched-node-malformed-digests",
    title="A node holding the secret asks a scheduler for a computation's files by a "
    "digest that is a list",
    goal="a warning, nothing sent, the jobs run; no traceback in the scheduler's log "
    "(was: a TypeError logged as an ERROR, the node's link to it ended)",
)
@pytest.mark.timeout(120)
def test_a_node_asking_for_files_by_lists_is_warned_of(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    node = _AsksByLists()
    with (
        serving_in_thread(node) as port,
        SchedulerProcess(tmp_path, [f"127.0.0.1:{port}"], SECRET.decode()) as sched,
    ):
        results = _alices_jobs(sched.address, people["alice"])
    log = sched.log_text()
    warned = "malformed digests" in log
    measure(f"jobs: {results}; warned: {warned}; {log.count('Traceback')} tracebacks")
    # (the node answers each job with the square of its key, not of its argument)
    assert len(results) == 4 and all(isinstance(r, int) for r in results)
    assert warned and "Traceback" not in log


#: Messages mallory sends that the scheduler refuses, each answered with an error.
REFUSED = 300

#: A log line about one of them (before: "user 'mallory': REASON", a line each).
_ABOUT_THEM = (
    r"WARNING (refused messages from )?user 'mallory': (no computation|job entries)"
)


async def _refused_messages(port: int, credential: Path) -> int:
    """Send `REFUSED` messages naming a computation she does not have, and as many
    job submissions whose entries count more buffers than they carry, reading the
    answers; return how many were refused."""
    conn = await raw_scheduler_session(port, credential)
    try:
        for _ in range(REFUSED):
            conn.write(JobCancel(comp_id=99, key=1, attempt=1))
            conn.write(JobSubmit(comp_id=1, jobs=[[1, 1, 1]]))
        await conn.flush()
        refused = 0
        async with asyncio.timeout(30):
            while refused < 2 * REFUSED:
                message, _ = await conn.recv()
                refused += isinstance(message, Error)
        return refused
    finally:
        conn.close()


@pytest.mark.attack(
    id="sched-refused-messages-log",
    title=f"A scheduler user sends {2 * REFUSED} messages the scheduler refuses "
    "(a computation not hers, malformed job entries), reading the answers",
    goal="each answered with the reason; at most 2 log lines about them, and one "
    "with the count left when the scheduler stops (was: a WARNING line each)",
)
@pytest.mark.timeout(120)
def test_refused_messages_cannot_flood_the_schedulers_log(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    with shared_nodes(tmp_path, people) as sched:
        refused = asyncio.run(_refused_messages(sched.port, people["mallory"]))
        during = len(re.findall(_ABOUT_THEM, sched.log_text()))
    counted = re.findall(r"refused messages: (\d+) more", sched.log_text())
    measure(
        f"{refused} refused; {during} log lines about them while the scheduler ran, "
        f"{sum(map(int, counted))} more counted at its stop"
    )
    assert refused == 2 * REFUSED
    assert during <= 2
    assert during + sum(map(int, counted)) == refused
