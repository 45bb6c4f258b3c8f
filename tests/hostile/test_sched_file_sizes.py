"""A scheduler user sends, first, the file another user's computation waits for,
announcing a size its content does not have.

Files are shared by digest between the users of a scheduler, and the scheduler
passed the message on as it came to the nodes waiting for that file: each node
refused a file-put whose buffer is not of the announced size by ending the
connection, which was the victim's computation's (a node lost to it per node).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dispynb.protocol import serialize
from dispynb.protocol.files import digest_of
from dispynb.protocol.messages import (
    ComputationFailed,
    ComputationReady,
    ComputationSetup,
    Error,
    FilePut,
    FilesMissing,
    JobResults,
    JobSubmit,
    Message,
)
from dispynb.transport.connection import Connection
from tests.hostile.test_scheduler import (
    people,
    shared_nodes,
)
from tests.sharedsched.harness import raw_scheduler_session

pytestmark = pytest.mark.slow

#: Seconds each step may take.
WAIT = 20

__all__ = ["people"]  # the fixture

#: The file alice's computation depends on: a common one, which mallory has too.
SHARED = memoryview(b"a library every lab uses\n" * 1000)


def read_dep(n: int) -> int:
    with open("dep.txt", "rb") as handle:
        return len(handle.read()) + n


async def _until(conn: Connection, kind: type[Message]) -> Message:
    """The first ``kind`` message ``conn`` gets (what it got instead fails)."""
    got: list[str] = []
    try:
        async with asyncio.timeout(WAIT):
            while True:
                message, _ = await conn.recv()
                if isinstance(message, kind):
                    return message
                assert not isinstance(message, ComputationFailed), message
                got.append(repr(message)[:200])
    except TimeoutError:
        raise AssertionError(f"no {kind.__name__} within {WAIT} s: {got}") from None


async def _refusal(conn: Connection) -> str:
    """The error ``conn`` was sent (by now, if any: its message was handled before
    the victim's jobs ran), or "none"."""
    try:
        while True:
            message, _ = await asyncio.wait_for(conn.recv(), 1)
            if isinstance(message, Error):
                return message.message
    except TimeoutError:
        return "none"


async def _attack(port: int, people: dict[str, Path]) -> tuple[str, list[int]]:
    alice = await raw_scheduler_session(port, people["alice"])
    mallory = await raw_scheduler_session(port, people["mallory"])
    try:
        digest = digest_of(SHARED)
        bundle = serialize.dumps({"func": read_dep, "setup": None, "setup_args": ()})
        alice.write(
            ComputationSetup(
                comp_id=1,
                name="lab",
                workers=2,
                files=[["dep.txt", digest, SHARED.nbytes]],
            ),
            bundle,
        )
        await _until(alice, FilesMissing)  # the nodes wait for it: alice uploads...
        # ...but mallory's copy comes first, its size a lie.
        mallory.write(FilePut(digest=digest, size=SHARED.nbytes + 1), [SHARED])
        alice.write(FilePut(digest=digest, size=SHARED.nbytes), [SHARED])
        ready = await _until(alice, ComputationReady)
        assert isinstance(ready, ComputationReady)
        buffers = [b for n in range(4) for b in serialize.dumps(((n,), {}))]
        alice.write(JobSubmit(comp_id=1, jobs=[[n, 1, 1] for n in range(4)]), buffers)
        results: dict[int, int] = {}
        async with asyncio.timeout(WAIT):
            while len(results) < 4:
                message, result_buffers = await alice.recv()
                assert not isinstance(message, Error), message
                if isinstance(message, JobResults):
                    offset = 0
                    for entry in message.results:
                        key, count = int(entry[0]), int(entry[-1])
                        part = result_buffers[offset : offset + count]
                        results[key] = serialize.loads(part)
                        offset += count
        return await _refusal(mallory), [results[n] for n in range(4)]
    finally:
        alice.close()
        mallory.close()


@pytest.mark.attack(
    id="sched-file-size-lie",
    title="A scheduler user sends first the file another user's computation waits "
    "for, announcing a size its content does not have",
    goal="refused, naming both sizes; the victim's computation gets the file and its "
    "jobs run (was: passed on as sent, each node ended the victim's connection)",
)
@pytest.mark.timeout(120)
def test_a_file_put_whose_size_lies_is_refused(tmp_path, people, measure) -> None:
    with shared_nodes(tmp_path, people) as sched:
        said, results = asyncio.run(_attack(sched.port, people))
    measure(f"mallory told: {said[:120]!r}; alice's results {results}")
    assert "announced" in said
    assert results == [SHARED.nbytes + n for n in range(4)]
