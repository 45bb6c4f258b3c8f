"""An authenticated client sends its node thousands of messages the node cannot
use, reading the answers: each was answered, and logged with a WARNING line each
(10,000 lines, 1 MB of the node's log, in a few seconds)."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import pytest

from dispynb.protocol.messages import Error
from tests.hostile.tools import RawSession, limited_node

pytestmark = pytest.mark.slow

#: Messages of each kind sent: an op the node does not know, and one it knows
#: but never takes from a client.
EACH = 5000

_ABOUT_THEM = re.compile(r"cannot use|sent unexpected")
_COUNTED = re.compile(r"messages this node cannot use: (\d+) more")
_FILES = re.compile(r"refused a file|files refused")
_FILES_COUNTED = re.compile(r"files refused: (\d+) more")
_SETUPS = re.compile(r"refused computation")
_SETUPS_COUNTED = re.compile(r"refused computations: (\d+) more")


def _lines_about_them(log: str, about: re.Pattern[str] = _ABOUT_THEM) -> int:
    """Lines of ``log`` about one refused message (not a count of them)."""
    return sum(
        1 for line in log.splitlines() if about.search(line) and " more " not in line
    )


def _answers(session: RawSession, count: int, errors: list[Error]) -> None:
    """Read ``count`` messages from the node into ``errors`` (those that are)."""
    for _ in range(count):
        message = session.recv()
        if isinstance(message, Error):
            errors.append(message)


def _all(session: RawSession, count: int, answers: list[Any]) -> None:
    """Read ``count`` messages from the node into ``answers``."""
    for _ in range(count):
        answers.append(session.recv())


@pytest.mark.attack(
    id="node-refused-messages-log",
    title=f"An authenticated client sends its node {2 * EACH} messages it cannot "
    "use (an unknown op, a message a node never takes), reading the answers",
    goal="each answered with an error; at most 2 log lines about them while the "
    "node runs, the rest counted in one line (was: a WARNING line each)",
)
@pytest.mark.timeout(120)
def test_refused_messages_cannot_flood_the_nodes_log(tmp_path: Path, measure):
    with limited_node(tmp_path / "node") as node:
        session = RawSession.open(node.port, node.secret, timeout=60)
        errors: list[Error] = []
        reader = threading.Thread(target=_answers, args=(session, 2 * EACH, errors))
        reader.start()
        try:
            for _ in range(EACH):
                session.send_header({"op": "no-such-op"})
                session.send_header({"op": "job-results", "comp_id": 1, "results": []})
            reader.join(60)
        finally:
            session.close()
        during = _lines_about_them(node.log_text())
    log = node.log_text()
    counted = sum(map(int, _COUNTED.findall(log)))
    measure(
        f"{len(errors)} errors answered; {during} log lines about them while the "
        f"node ran, {counted} more counted"
    )
    assert len(errors) == 2 * EACH
    assert during <= 2, log[-2000:]
    assert during + counted == 2 * EACH, log[-2000:]


@pytest.mark.attack(
    id="node-refused-files-log",
    title=f"An authenticated client sends its node {EACH} files whose content does "
    "not match their digest",
    goal="each refused; at most 2 log lines about them while the node runs, the "
    "rest counted in one line (was: a WARNING line each)",
)
@pytest.mark.timeout(120)
def test_refused_files_cannot_flood_the_nodes_log(tmp_path: Path, measure):
    with limited_node(tmp_path / "node") as node:
        session = RawSession.open(node.port, node.secret, timeout=60)
        try:
            for _ in range(EACH):
                header = {"op": "file-put", "digest": "ab" * 32, "size": 1}
                session.send_header(header, (b"x",))
            session.send_header({"op": "no-such-op"})  # answered after them all
            while not isinstance(session.recv(), Error):
                pass
        finally:
            session.close()
        during = _lines_about_them(node.log_text(), _FILES)
    counted = sum(map(int, _FILES_COUNTED.findall(node.log_text())))
    measure(f"{during} log lines about them while the node ran, {counted} counted")
    assert during <= 2, node.log_text()[-2000:]
    assert during + counted == EACH, node.log_text()[-2000:]


@pytest.mark.attack(
    id="node-refused-setups-log",
    title=f"An authenticated client sends its node {EACH} computation setups it "
    "refuses (a file named out of its directory), reading the answers",
    goal="each answered; at most 2 log lines about them while the node runs, the "
    "rest counted in one line (was: a WARNING line each)",
)
@pytest.mark.timeout(120)
def test_refused_setups_cannot_flood_the_nodes_log(tmp_path: Path, measure):
    with limited_node(tmp_path / "node") as node:
        session = RawSession.open(node.port, node.secret, timeout=60)
        answers: list[Any] = []
        reader = threading.Thread(target=_all, args=(session, EACH, answers))
        reader.start()
        try:
            for comp_id in range(1, EACH + 1):
                header = {
                    "op": "computation-setup",
                    "comp_id": comp_id,
                    "name": "refused",
                    "workers": 1,
                    "files": [["../../x", "ab" * 32, 1]],
                }
                session.send_header(header)
            reader.join(60)
        finally:
            session.close()
        during = _lines_about_them(node.log_text(), _SETUPS)
    counted = sum(map(int, _SETUPS_COUNTED.findall(node.log_text())))
    measure(
        f"{len(answers)} answered; {during} log lines about them while the node "
        f"ran, {counted} counted"
    )
    assert len(answers) == EACH
    assert during <= 2, node.log_text()[-2000:]
    assert during + counted == EACH, node.log_text()[-2000:]
