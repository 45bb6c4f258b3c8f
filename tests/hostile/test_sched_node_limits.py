"""A user of a shared scheduler sends a setup its nodes cannot take.

The scheduler sends each computation's setup (its functions and what it lists)
and its files to every node. A node refuses a message over its
``--max-message-size`` by ending the connection: the scheduler pushed 24 MiB to
each node, each dropped it, and the client heard of lost connections, not why.
Now the scheduler sends a node nothing over its limit (its `Welcome` says it):
the computation runs on the nodes that take it, and fails, saying why and naming
the option, where none does. A setup whose file entries hold what no node takes
(nested lists: 64 times their size in memory once decoded) is refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from dispynb import SharedJobCluster
from dispynb.errors import SetupError
from dispynb.protocol import serialize
from dispynb.protocol.messages import ComputationFailed, ComputationSetup
from tests.hostile.test_scheduler import people
from tests.hostile.tools import limited_node, strong_secret
from tests.sharedsched.harness import SchedulerProcess, raw_scheduler_session

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

__all__ = ["people"]  # the fixture

MiB = 1 << 20
#: What the small nodes take (a node of 1 MiB has no room for a result besides
#: the output its jobs may print), and what the user's setup or file holds.
NODE_LIMIT = 8 * MiB
LARGE = 3 * NODE_LIMIT
#: Seconds the client may wait for its answer.
WAIT = 60
#: What the scheduler may grow by while it decodes setups holding junk, one at a
#: time (its allocator keeps some of what one took).
JUNK_BOUND = 400 * MiB


def carrying(blob: bytes) -> Callable[[int], int]:
    """A function that travels with ``blob`` (its closure, pickled by value)."""

    def compute(n: int) -> int:
        return len(blob) + n

    return compute


@contextlib.contextmanager
def scheduler_over(
    tmp_path: Path, limits: list[int | None], cpus: int = 1
) -> Iterator[tuple[SchedulerProcess, list[Any]]]:
    """A scheduler owning a node of ``cpus`` per item of ``limits`` (its
    --max-message-size; None: the default)."""
    secret = strong_secret()
    with contextlib.ExitStack() as stack:
        nodes = [
            stack.enter_context(
                limited_node(
                    tmp_path / f"node{i}",
                    *(["--max-message-size", str(limit)] if limit else []),
                    secret=secret,
                    name=f"node{i}",
                    cpus=cpus,
                )
            )
            for i, limit in enumerate(limits)
        ]
        sched = stack.enter_context(
            SchedulerProcess(tmp_path, [node.spec for node in nodes], secret)
        )
        yield sched, nodes


def _set_up(
    sched: SchedulerProcess, credential: Path, compute: Any, **options: Any
) -> tuple[str, float]:
    """Set a cluster up: the error it stops with ("" if none) and the seconds."""
    start = time.monotonic()
    try:
        with SharedJobCluster(
            compute,
            scheduler_host=sched.address,
            secret_file=str(credential),
            **options,
        ) as cluster:
            job = cluster.submit(1)
            assert cluster.wait(timeout=WAIT)
            assert job.result is not None, (job.status, job.exception)
    except SetupError as exc:
        return str(exc), time.monotonic() - start
    return "", time.monotonic() - start


@pytest.mark.attack(
    id="sched-setup-over-nodes",
    title=f"A scheduler user sets up a computation whose functions take "
    f"{LARGE // MiB} MiB, or that depends on a file of {LARGE // MiB} MiB, on nodes "
    f"taking messages of {NODE_LIMIT // MiB} MiB (--max-message-size)",
    goal="the cluster fails to set up, saying why and naming --max-message-size; "
    "nothing of it sent to the nodes (was: pushed to each, which ended the "
    "connection: the client heard 'connection closed')",
)
@pytest.mark.parametrize("what", ["functions", "file"])
def test_a_setup_over_every_nodes_limit_fails_saying_why(
    what: str, tmp_path: Path, people: dict[str, Path], measure
) -> None:
    options: dict[str, Any] = {}
    compute: Any = carrying(b"x" * LARGE)
    if what == "file":
        data = tmp_path / "data.bin"
        data.write_bytes(b"y" * LARGE)
        compute, options["depends"] = carrying(b""), [str(data)]
    with scheduler_over(tmp_path, [NODE_LIMIT, NODE_LIMIT]) as (sched, nodes):
        error, took = _set_up(sched, people["alice"], compute, **options)
        logs = "".join(node.log_text() for node in nodes)
    measure(f"{what}: after {took:.1f} s: {error[:240]}")
    assert "dispynb-node --max-message-size" in error, error
    assert f"over the {NODE_LIMIT} bytes" in error or (
        f"over the messages of {NODE_LIMIT} bytes" in error
    ), error
    assert "over the" not in logs, logs  # no node met the oversized message


@pytest.mark.attack(
    id="sched-setup-over-some-nodes",
    title=f"A scheduler user's computation, whose functions take {LARGE // MiB} "
    f"MiB, on a node taking messages of {NODE_LIMIT // MiB} MiB and one taking "
    "the default 1 GiB",
    goal="its jobs run on the node that takes it; the other is not sent it",
)
def test_a_setup_over_some_nodes_limit_runs_on_the_others(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    with scheduler_over(tmp_path, [NODE_LIMIT, None]) as (sched, nodes):
        with SharedJobCluster(
            carrying(b"x" * LARGE),
            scheduler_host=sched.address,
            secret_file=str(people["alice"]),
        ) as cluster:
            jobs = [cluster.submit(n) for n in range(4)]
            assert cluster.wait(timeout=WAIT)
            results = [job.result for job in jobs]
            where = {job.ip_addr for job in jobs}
        small_log = nodes[0].log_text()
    measure(f"results {results}; ran on {len(where)} node(s)")
    assert results == [LARGE + n for n in range(4)]
    assert "over the" not in small_log, small_log
    assert "not sent to node" in sched.log_text()


@pytest.mark.attack(
    id="sched-setup-nested-entry",
    title="A scheduler user sets up 4 computations, each listing a file whose "
    "entry holds 1 M empty lists (1 MB sent, some 64 MB of objects decoded: fewer "
    "than the scheduler refuses undecoded in any header)",
    goal=f"each refused at once as a malformed file entry; the scheduler grows by "
    f"under {JUNK_BOUND // MiB} MiB, what one being decoded takes (was: each kept "
    "while its computation lived, counted as 1 KiB: +851 MiB; and sent to every "
    "node, which decoded it and ended the connection)",
)
def test_a_setup_whose_file_entries_hold_junk_is_refused(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    count = 1_000_000  # under what a header may hold: `inbox._check_header`
    junk = [[] for _ in range(count)]

    async def attack(sched: SchedulerProcess) -> tuple[list[str], int]:
        assert sched.proc is not None
        scheduler = psutil.Process(sched.proc.pid)
        conn = await raw_scheduler_session(sched.port, people["mallory"])
        try:
            before = scheduler.memory_info().rss
            bundle = serialize.dumps({"func": carrying(b""), "setup": None})
            for comp_id in range(1, 5):
                entry = ["data.bin", f"{comp_id:064x}", 1, junk]
                conn.write(
                    ComputationSetup(
                        comp_id=comp_id, name="junk", workers=1, files=[entry]
                    ),
                    bundle,
                )
            refusals: list[str] = []
            async with asyncio.timeout(WAIT):
                while len(refusals) < 4:
                    message, _ = await conn.recv()
                    if isinstance(message, ComputationFailed):
                        refusals.append(message.message)
            return refusals, scheduler.memory_info().rss - before
        finally:
            conn.close()

    with scheduler_over(tmp_path, [None]) as (sched, _nodes):
        refusals, grown = asyncio.run(attack(sched))
    measure(
        f"{len(refusals)} of 4 refused ({refusals[0][:100]}); scheduler "
        f"+{grown / MiB:.0f} MiB after"
    )
    assert all("malformed file entry" in text for text in refusals), refusals
    assert grown < JUNK_BOUND


def length(data: bytes) -> int:
    return len(data)


@pytest.mark.attack(
    id="sched-jobs-over-nodes",
    title=f"A scheduler user submits 8 jobs of {LARGE // 8 // MiB} MiB of "
    f"arguments each and one of {LARGE // MiB} MiB to nodes of 4 CPUs taking "
    f"messages of {NODE_LIMIT // MiB} MiB (--max-message-size)",
    goal="the 8 run, sent in messages the node takes; the large one ends "
    "Cancelled naming --max-message-size (was: sent together, over the limit: "
    "the node ended the connection, every job there lost)",
)
def test_jobs_go_to_a_node_in_messages_it_takes(
    tmp_path: Path, people: dict[str, Path], measure
) -> None:
    small = LARGE // 8
    with scheduler_over(tmp_path, [NODE_LIMIT], cpus=4) as (sched, nodes):
        with SharedJobCluster(
            length,
            scheduler_host=sched.address,
            secret_file=str(people["alice"]),
        ) as cluster:
            jobs = [cluster.submit(bytes(small)) for _ in range(8)]
            large = cluster.submit(bytes(LARGE))
            assert cluster.wait(timeout=WAIT)
            results = [job.result for job in jobs]
        logs = nodes[0].log_text()
    measure(
        f"results {sorted(set(results))} x{len(results)}; the large one "
        f"{large.status.name}: {str(large.exception)[:160]}"
    )
    assert results == [small] * 8
    assert large.status.name == "Cancelled", large.status
    assert "dispynb-node --max-message-size" in str(large.exception)
    assert "over the" not in logs, logs
