"""A node and a shared scheduler take seeded fuzzed messages from a peer that holds
the secret (`tests.fuzz.wire`): each survives, warns of what it refused (no
traceback), answers a well-formed client afterwards, and holds no more descriptors
or memory than before once the fuzzing sessions have ended.

Bounded by message count, not time: the same seed sends the same messages. The
seeds and counts are those with which the last session's fuzzers found the
handlers' tracebacks fixed in 1ec9403 (node) and 228b04f (scheduler).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path

import pytest

from dispynb import JobCluster, SharedJobCluster
from dispynb.secret import read_secret_file
from tests.fuzz.wire import FuzzingNode, footprint, fuzz_server
from tests.hostile.test_scheduler import _alices_jobs, people, shared_nodes
from tests.hostile.tools import limited_node, wait_for
from tests.sharedsched.harness import SchedulerProcess
from tests.transport.util import SECRET, serving_in_thread

pytestmark = pytest.mark.slow

__all__ = ["people"]  # the fixture

#: Messages sent, and the seed that draws them.
COUNT = 600
SEED = 7
#: Resident memory the server may have grown by (MiB), fuzzing over.
MEMORY = 32
#: What a refusal logged as a warning says (a malformed field, message or entry).
REFUSED = re.compile(r"WARNING.*(malformed|has type|unexpected|missing|not a|invalid)")

#: Fuzzed messages a fake node sends before each job's result (to a scheduler).
PER_JOB = 30

MiB = 1 << 20


def _square(n: int) -> int:
    return n * n


def _jobs_through(address: str, credential: Path) -> list[str]:
    """Run 3 jobs through the scheduler at ``address``: how they ended."""
    with SharedJobCluster(
        _square, scheduler_host=address, secret_file=str(credential)
    ) as cluster:
        jobs = [cluster.submit(n) for n in range(3)]
        for job in jobs:
            with contextlib.suppress(Exception):  # what the node made of it
                job.future.result(timeout=10)
        return sorted({job.status.name for job in jobs})


def _check(
    pid: int,
    before: tuple[int, int],
    log: str,
    tally: dict[str, int],
    answered: object,
    expected: object,
    warned: re.Pattern[str] = REFUSED,
) -> None:
    """The server survived, warned (``warned``), answered, and let go of what the
    fuzzing took."""
    fds, rss = footprint(pid)
    warnings = [line for line in log.splitlines() if warned.search(line)]
    grown = (rss - before[1]) / MiB
    summary = (
        f"{tally['sent']} sent over {tally['sessions']} sessions; {len(warnings)} "
        f"warnings; fds {before[0]} -> {fds}; RSS +{grown:.1f} MiB; answered {answered}"
    )
    assert answered == expected, summary
    first = min(
        (i for i in (log.find("Traceback"), log.find(" ERROR ")) if i >= 0), default=-1
    )
    assert first < 0, f"{summary}; logged:\n{log[max(first - 300, 0) : first + 3000]}"
    assert warnings, summary
    assert fds <= before[0] + 2, summary
    assert grown < MEMORY, summary


@pytest.mark.timeout(90)
def test_a_node_survives_fuzzed_messages_of_a_client(tmp_path: Path) -> None:
    with limited_node(tmp_path / "node", cpus=1) as node:
        secret = node.secret.encode()
        # Warm: a computation set up and closed once (worker processes, caches).
        with JobCluster(abs, nodes=[node.spec], secret=node.secret) as cluster:
            assert cluster.submit(-1)() == 1
        before = footprint(node.proc.pid)
        tally = asyncio.run(fuzz_server(node.port, secret, SEED, COUNT))
        assert node.proc.poll() is None, "the node died"
        with JobCluster(abs, nodes=[node.spec], secret=node.secret) as cluster:
            answered = cluster.submit(-3)()
        # The fuzzing sessions' computations end once their clients have gone.
        wait_for(
            lambda: footprint(node.proc.pid)[0] <= before[0] + 2,
            "the node's descriptors back",
        )
        _check(node.proc.pid, before, node.log_text(), tally, answered, 3)


@pytest.mark.timeout(120)
def test_a_scheduler_survives_fuzzed_messages_of_a_user(
    tmp_path: Path, people: dict[str, Path]
) -> None:
    with shared_nodes(tmp_path, people) as sched:
        assert sched.proc is not None
        pid = sched.proc.pid
        assert _alices_jobs(sched.address, people["alice"]) == [0, 1, 4, 9]  # warm
        before = footprint(pid)
        secret = read_secret_file(people["mallory"])
        tally = asyncio.run(fuzz_server(sched.port, secret, SEED, COUNT))
        assert sched.proc.poll() is None, "the scheduler died"
        answered = _alices_jobs(sched.address, people["alice"])
        wait_for(
            lambda: footprint(pid)[0] <= before[0] + 2,
            "the scheduler's descriptors back",
        )
        _check(pid, before, sched.log_text(), tally, answered, [0, 1, 4, 9])


@pytest.mark.timeout(120)
def test_a_scheduler_survives_fuzzed_messages_of_a_node(
    tmp_path: Path, people: dict[str, Path]
) -> None:
    node = FuzzingNode(SEED, PER_JOB)
    with (
        serving_in_thread(node) as port,
        SchedulerProcess(tmp_path, [f"127.0.0.1:{port}"], SECRET.decode()) as sched,
    ):
        assert sched.proc is not None
        pid = sched.proc.pid
        before = footprint(pid)
        outcomes = [_jobs_through(sched.address, people["alice"]) for _ in range(2)]
        assert sched.proc.poll() is None, "the scheduler died"
        node.fuzzing = False
        wait_for(
            lambda: footprint(pid)[0] <= before[0] + 2,
            "the scheduler's descriptors back",
        )
        answered = _jobs_through(sched.address, people["alice"])
        _check(
            pid,
            before,
            sched.log_text(),
            {"sent": PER_JOB * 3 * 2, "sessions": len(outcomes)},
            answered,
            ["Finished"],
            # (why it dropped the node is the client's to hear, in its error)
            re.compile(rf"WARNING.*node 127.0.0.1:{port} lost"),
        )
