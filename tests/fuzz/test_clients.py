"""A client (`JobCluster`) takes seeded fuzzed messages from a node that holds the
secret (`tests.fuzz.wire`): before each job's result, the node sends messages of
every op with the wrong things inside, naming the job. The client drops that node
with a warning (no traceback, no error logged), closes cleanly, holds no more
descriptors or memory than before, and then runs jobs on an honest node.

Bounded by message count (the seed and count of the last session's fuzzer, which
found the tracebacks fixed in f47f3ed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random

import psutil
import pytest

from dispynb import JobCluster
from dispynb.errors import DispynbError
from dispynb.protocol.messages import JobResults, JobSubmit
from dispynb.transport.connection import Connection
from tests.fuzz.wire import fuzzed_message
from tests.hostile.scripted import ScriptedNode, finished
from tests.transport.util import SECRET, serving_in_thread

pytestmark = pytest.mark.slow

#: Clusters set up over the fuzzing node, jobs each, fuzzed messages before a result.
ROUNDS = 4
JOBS = 5
PER_JOB = 30
SEED = 7
#: Resident memory the client may have grown by (MiB), fuzzing over.
MEMORY = 32

MiB = 1 << 20


def square(n: int) -> int:
    return n * n


class _HonestNode(ScriptedNode):
    """Each job's result: the square of its key (a cluster's keys are 1, 2...)."""

    async def jobs(self, conn: Connection, message: JobSubmit) -> None:
        for key, attempt, *_rest in message.jobs:
            conn.write(
                JobResults(comp_id=message.comp_id, results=[finished(key, attempt)]),
                [pickle.dumps(key * key)],
            )


class _FuzzingNode(_HonestNode):
    """Fuzzed messages naming each job (`PER_JOB`), then its result."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)

    async def jobs(self, conn: Connection, message: JobSubmit) -> None:
        for key, _attempt, *_rest in message.jobs:
            for _ in range(PER_JOB):
                fuzzed = fuzzed_message(self.rng, message.comp_id, key)
                buffers = [pickle.dumps(1)] * self.rng.randint(0, 2)
                with contextlib.suppress(DispynbError):  # written after a drop
                    conn.write(fuzzed, buffers)
        await super().jobs(conn, message)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(60)
def test_a_client_survives_fuzzed_messages_of_a_node(caplog) -> None:
    caplog.set_level(logging.WARNING)
    before = _fds(), psutil.Process().memory_info().rss
    outcomes = []
    with serving_in_thread(_FuzzingNode(SEED)) as port:
        for _ in range(ROUNDS):
            with JobCluster(
                square, nodes=[f"127.0.0.1:{port}"], secret=SECRET
            ) as cluster:
                jobs = [cluster.submit(n) for n in range(JOBS)]
                for job in jobs:
                    job()
                outcomes.append(sorted({job.status.name for job in jobs}))
    fds, rss = _fds(), psutil.Process().memory_info().rss
    with (
        serving_in_thread(_HonestNode()) as port,
        JobCluster(square, nodes=[f"127.0.0.1:{port}"], secret=SECRET) as cluster,
    ):
        answered = [job() for job in [cluster.submit(n) for n in range(4)]]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    dropped = [r for r in caplog.records if "left:" in r.getMessage()]
    grown = (rss - before[1]) / MiB
    summary = (
        f"jobs ended {outcomes}; {len(dropped)} drops warned; fds {before[0]} -> "
        f"{fds}; RSS +{grown:.1f} MiB; then {answered}; errors: "
        f"{[r.getMessage()[:200] for r in errors[:3]]}"
    )
    assert answered == [1, 4, 9, 16], summary  # its keys' squares: keys count from 1
    assert not errors and dropped, summary
    assert fds <= before[0] and grown < MEMORY, summary
