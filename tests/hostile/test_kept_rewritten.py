"""A job changes a kept result's file while its node sends it to the recovering
client.

The node checks a kept result (`nodeserver.spoolcheck`) and sends it in chunks, as
the client takes them. It sent them from a map of the file itself, which the node's
jobs can write: one that rewrote the file in place once the check was made had its
bytes reach the client as the result; one that cut it short ended the client's
connection (the node's send of the pages cut off failed: 'Bad address'). A raw
recovering client that takes one chunk, then waits while "the job" (the node's
user) changes the file."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from dispynb.errors import DispynbError
from dispynb.journal import Journal
from dispynb.protocol.messages import JobResults, Recover, ResultChunk
from dispynb.transport.connector import connect
from tests.api.test_recovery_kept import (
    LIMIT,
    kept_files,
    kill_client_with_kept_results,
)
from tests.jobs import wait_until
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow

MiB = 1 << 20
RESULT = 32 * MiB
FORGED = b"FORGED!!"


def _rewrite(path: Path) -> None:
    """The second half of the file written over, in place (the same inode)."""
    with open(path, "r+b") as handle:
        handle.seek(RESULT // 2)
        handle.write(FORGED * (RESULT // 4 // len(FORGED)))


def _cut(path: Path) -> None:
    os.truncate(path, RESULT // 4)


async def _recover_slowly(port: int, secret: str, journal: Path, change) -> str:
    """Recover: take a chunk, have the file changed, take the rest; what came."""
    (recovery_id, _name, _nodes), *_ = Journal(str(journal)).computations()
    conn, _ = await connect(
        "127.0.0.1", port, secret=secret.encode(), max_message_size=LIMIT
    )
    forged = chunks = 0
    try:
        conn.write(Recover(comp_id=1, recovery_id=recovery_id, max_message_size=LIMIT))
        changed = False
        async with asyncio.timeout(60):
            while True:
                message, buffers = await conn.recv()
                if isinstance(message, ResultChunk):
                    chunks += 1
                    forged += sum(FORGED in bytes(b) for b in buffers)
                    if not changed:
                        change()
                        changed = True
                        await asyncio.sleep(0.5)  # the node sends what it can meanwhile
                elif isinstance(message, JobResults) and message.results:
                    entry = message.results[0]
                    return f"{chunks} chunks, {forged} with forged bytes, {entry[2]}"
    except DispynbError as exc:
        return f"{chunks} chunks, {forged} forged, then: {exc}"
    finally:
        conn.close()


@pytest.mark.attack(
    id="kept-result-changed-while-sent",
    title=f"A job rewrites in place, or cuts short, a kept result of {RESULT // MiB} "
    "MiB while its node sends it in chunks to a recovering client that reads slowly",
    goal="no byte the job wrote reaches the client, and the result comes whole "
    "(was: the rewritten chunks were sent as the result; the cut one ended the "
    "client's connection, the node's send failing with 'Bad address')",
)
@pytest.mark.parametrize("change", [_rewrite, _cut], ids=["rewritten", "cut"])
@pytest.mark.timeout(180)
def test_a_kept_result_changed_while_sent_never_reaches_the_client(
    tmp_path: Path, measure, change
) -> None:
    with running_node(tmp_path / "node") as node:
        journal, _expected = kill_client_with_kept_results(
            tmp_path, node, [f"bytes:{RESULT}"]
        )
        wait_until(lambda: len(kept_files(tmp_path / "node")) == 1)
        (path,) = kept_files(tmp_path / "node")
        said = asyncio.run(
            _recover_slowly(node.port, node.secret, journal, lambda: change(path))
        )
        alive = node.proc.poll() is None
        measure(f"{change.__name__.strip('_')}: {said}; node alive: {alive}")
    assert alive
    assert " 0 with forged bytes, finished" in said, said
