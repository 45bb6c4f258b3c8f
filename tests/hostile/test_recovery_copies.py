"""Clients recovering one kept result at once, none reading.

A node sends a kept result from a copy only it reaches (a file with no name, or
memory): a job can change the spooled file. Each recovery made its own copy, and a
client that does not read what it is sent holds it: the holder of a recovery id
opening connection after connection, each recovering the same result, had the node
make a copy of it per connection (disk, or memory where no file system makes files
without a name). Now the latest recovery of a computation ends the one before it
(whose client is told why), and starts once that one's copy is let go.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dispynb.journal import Journal
from dispynb.protocol.messages import (
    FINISHED,
    KEPT_UNAVAILABLE,
    Error,
    JobResults,
    Recover,
    Recovered,
)
from dispynb.protocol.records import ResultEntry
from tests.api.test_recovery_kept import kept_files, kill_client_with_kept_results
from tests.hostile.tools import RawSession
from tests.jobs import wait_until
from tests.nodeproc import running_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MiB = 1 << 20
#: The kept result (more than the sockets take: each recovery holds its copy), and
#: the clients that recover it at once.
RESULT = 48 * MiB
CLIENTS = 4

#: A copy of a kept result in the node's memory map: a file with no name
#: (O_TMPFILE: ``DIR/#INODE (deleted)``) or a memfd.
_COPY = re.compile(r"(/#\d+|/memfd:dispynb-kept) \(deleted\)$")


def _copies(pid: int) -> int:
    """Copies of kept results the node ``pid`` holds mapped (distinct files)."""
    inodes = set()
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and _COPY.search(fields[5].rstrip("\n")):
                inodes.add((fields[3], fields[4]))
    return len(inodes)


def _closed_by_node(session: RawSession) -> bool:
    """Whether the node closed ``session``'s connection (ours half open)."""
    port = session.sock.getsockname()[1]
    return any(
        c.laddr and c.laddr.port == port and c.status == psutil.CONN_CLOSE_WAIT
        for c in psutil.Process().net_connections("tcp")
    )


@contextlib.contextmanager
def _sessions(port: int, secret: str) -> Iterator[list[RawSession]]:
    sessions: list[RawSession] = []
    try:
        yield sessions
    finally:
        for session in sessions:
            session.close()


@pytest.mark.attack(
    id="kept-result-recovered-at-once",
    title=f"{CLIENTS} connections recover the same kept result of {RESULT // MiB} "
    "MiB at once, none reading",
    goal="the node holds one copy of it at most; the earlier recoveries end, their "
    "clients told why; the latest gets the result (was: a copy per connection)",
)
def test_recoveries_of_one_result_at_once_hold_one_copy(
    tmp_path: Path, measure
) -> None:
    with running_node(tmp_path / "node") as node:
        journal, _expected = kill_client_with_kept_results(
            tmp_path, node, [f"bytes:{RESULT}"]
        )
        wait_until(lambda: len(kept_files(tmp_path / "node")) == 1)
        (recovery_id, _name, _nodes), *_ = Journal(str(journal)).computations()
        pid = node.proc.pid
        peak = 0
        with _sessions(node.port, node.secret) as sessions:
            for _ in range(CLIENTS):
                session = RawSession.open(node.port, node.secret)
                sessions.append(session)
                session.send(Recover(comp_id=1, recovery_id=recovery_id))

            def settled() -> bool:
                nonlocal peak
                copies = _copies(pid)
                peak = max(peak, copies)
                earlier = sessions[:-1]
                return copies >= 1 and all(_closed_by_node(s) for s in earlier)

            with contextlib.suppress(AssertionError):
                wait_until(settled, timeout=30)
            closed = sum(_closed_by_node(s) for s in sessions[:-1])
            told = sessions[-2].recv()  # (it had been sent nothing before)
            got: list[ResultEntry] = []
            while not isinstance(message := sessions[-1].recv(), Recovered):
                if isinstance(message, JobResults):
                    got += [ResultEntry.from_wire(r)[0] for r in message.results]
    measure(
        f"at most {peak} copies held at once; {closed} of {CLIENTS - 1} earlier "
        f"recoveries ended (told: {getattr(told, 'message', told)!s:.70}...); the "
        f"latest got {[entry.outcome for entry in got]}"
    )
    assert peak == 1
    assert closed == CLIENTS - 1
    assert isinstance(told, Error) and told.code == KEPT_UNAVAILABLE
    assert "another connection recovers these results now" in told.message
    assert [entry.outcome for entry in got] == [FINISHED]
