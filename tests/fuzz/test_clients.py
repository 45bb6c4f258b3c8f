"""A client (`JobCluster`) takes seeded fuzzed messages from a node that holds the
secret (`tests.fuzz.wire`): before each job's result, the node sends messages of
every op with the wrong things inside, naming the job. The client drops that node
with a warning (no traceback, no error logged), closes cleanly, holds no more
descriptors or memory than before, and then runs jobs on an honest node.

Bounded by message count (the seed and count of the last session's fuzzer, which
found the tracebacks fixed in f47f3ed).
"""

from __future__ import annotations

import logging
import os

import psutil
import pytest

from dispynb import JobCluster
from tests.fuzz.wire import FuzzingNode, HonestNode
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


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(60)
def test_a_client_survives_fuzzed_messages_of_a_node(caplog) -> None:
    caplog.set_level(logging.WARNING)
    before = _fds(), psutil.Process().memory_info().rss
    outcomes = []
    with serving_in_thread(FuzzingNode(SEED, PER_JOB)) as port:
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
        serving_in_thread(HonestNode()) as port,
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
