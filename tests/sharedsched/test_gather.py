"""A node's results read together reach the client as one message per computation
(`schedserver.session.SchedulerSession.gather`), in the node's order."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dispynb import LocalCluster, SharedJobCluster
from dispynb.job import DispyJob, JobStatus
from dispynb.protocol.messages import JobResults, Message, Ping, pack_header
from schedserver.session import SchedulerSession
from schedserver.toclient import GATHER_BYTES
from tests.sharedsched.harness import SchedulerProcess


class RecordingConnection:
    """What the session writes, one entry per system call."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[Message, list[Any]]]] = []

    def write(self, message: Message, buffers: Any = ()) -> None:
        self.calls.append([(message, list(buffers))])

    def write_many(self, messages: Any) -> None:
        self.calls.append([(m, list(b)) for m, b in messages])


def session_over(conn: RecordingConnection) -> SchedulerSession:
    server = SimpleNamespace(config=SimpleNamespace(pulse_interval=1.0))
    return SchedulerSession(conn, server, "alice")  # type: ignore[arg-type]


#: A small results message's size, and a client's max_message_size far above it.
SIZE = 100
LIMIT = 1 << 20


def entry(key: int, count: int) -> list[Any]:
    return [key, 1, 1, 1.0, 2.0, "", "", "", count]


def test_results_gathered_keep_buffers_and_starts_in_the_nodes_order() -> None:
    async def run() -> RecordingConnection:
        conn = RecordingConnection()
        session = session_over(conn)
        b = [memoryview(bytes([n])) for n in range(4)]
        # first message: job 1 started and ended, job 2 started after it
        session.gather(
            JobResults(
                comp_id=7,
                results=[entry(1, 1)],
                started=[[1, 1, 1.0, 0], [2, 1, 1.5, 1]],
            ),
            [b[0]],
            SIZE,
            LIMIT,
        )
        # second: job 3 started before job 2 ended; job 3 ended (two buffers)
        session.gather(
            JobResults(
                comp_id=7,
                results=[entry(2, 1), entry(3, 2)],
                started=[[3, 1, 1.7, 0]],
            ),
            [b[1], b[2], b[3]],
            SIZE,
            LIMIT,
        )
        session.gather(JobResults(comp_id=8, results=[entry(9, 0)]), [], SIZE, LIMIT)
        assert conn.calls == []  # held until the caller is done with the burst
        session.send_gathered()
        session.send_gathered()  # nothing left: no empty message
        return conn

    conn = asyncio.run(run())
    assert len(conn.calls) == 1  # one system call for both computations
    (first, first_buffers), (second, second_buffers) = conn.calls[0]
    assert isinstance(first, JobResults) and isinstance(second, JobResults)
    assert first.comp_id == 7 and second.comp_id == 8
    assert [r[0] for r in first.results] == [1, 2, 3]
    assert [bytes(v) for v in first_buffers] == [b"\x00", b"\x01", b"\x02", b"\x03"]
    # A start's ``before`` counts the results before it in the joined message.
    assert first.started == [[1, 1, 1.0, 0], [2, 1, 1.5, 1], [3, 1, 1.7, 1]]
    assert [r[0] for r in second.results] == [9] and second_buffers == []


def test_any_other_message_sends_what_was_gathered_first() -> None:
    async def run() -> RecordingConnection:
        conn = RecordingConnection()
        session = session_over(conn)
        session.gather(JobResults(comp_id=1, results=[entry(1, 0)]), [], SIZE, LIMIT)
        session.send(Ping())
        return conn

    conn = asyncio.run(run())
    kinds = [type(m).__name__ for call in conn.calls for m, _ in call]
    assert kinds == ["JobResults", "Ping"]


def test_the_last_results_of_a_burst_join_the_gathered_ones_and_go_at_once() -> None:
    async def run() -> RecordingConnection:
        conn = RecordingConnection()
        session = session_over(conn)
        session.send(JobResults(comp_id=1, results=[entry(1, 0)]))  # alone: at once
        session.gather(JobResults(comp_id=1, results=[entry(2, 0)]), [], SIZE, LIMIT)
        session.send(JobResults(comp_id=1, results=[entry(3, 0)]), [], SIZE, LIMIT)
        return conn

    conn = asyncio.run(run())
    assert [[[r[0] for r in m.results] for m, _ in call] for call in conn.calls] == [
        [[1]],
        [[2, 3]],
    ]


def test_large_results_are_not_held() -> None:
    async def run() -> RecordingConnection:
        conn = RecordingConnection()
        session = session_over(conn)
        session.gather(
            JobResults(comp_id=1, results=[entry(1, 1)]),
            [memoryview(bytes(GATHER_BYTES))],
            GATHER_BYTES + SIZE,
            LIMIT,
        )
        return conn

    assert len(asyncio.run(run()).calls) == 1


def body_size(message: Message, buffers: list[memoryview]) -> int:
    """What a peer's max_message_size counts of ``message`` on a signed connection."""
    header = pack_header(message.to_header())
    return 4 * (1 + len(buffers)) + len(header) + sum(b.nbytes for b in buffers) + 32


def test_results_are_joined_only_up_to_the_clients_max_message_size() -> None:
    limit = 64 * 1024
    parts = [
        (
            JobResults(
                comp_id=1, results=[entry(key, 1)], started=[[key + 10, 1, 1.0, 1]]
            ),
            [memoryview(bytes(30 * 1024))],
        )
        for key in (1, 2, 3)
    ]

    async def run() -> RecordingConnection:
        conn = RecordingConnection()
        session = session_over(conn)
        for message, buffers in parts[:2]:
            session.gather(message, buffers, body_size(message, buffers), limit)
        assert conn.calls == []  # two fit in one message: held
        message, buffers = parts[2]
        session.send(message, buffers, body_size(message, buffers), limit)
        return conn

    conn = asyncio.run(run())
    sent = [(m, b) for call in conn.calls for m, b in call]
    assert [[r[0] for r in m.results] for m, _ in sent] == [[1, 2], [3]]
    assert all(body_size(m, b) <= limit for m, b in sent)


def test_results_of_unknown_size_are_not_joined() -> None:
    async def run() -> RecordingConnection:
        conn = RecordingConnection()
        session = session_over(conn)
        session.gather(JobResults(comp_id=1, results=[entry(1, 0)]), [], SIZE, LIMIT)
        session.send(JobResults(comp_id=1, results=[entry(2, 0)]))  # no size
        return conn

    conn = asyncio.run(run())
    assert [[[r[0] for r in m.results] for m, _ in call] for call in conn.calls] == [
        [[1]],
        [[2]],
    ]


def test_results_held_at_the_end_of_a_burst_go_at_the_next_loop_turn() -> None:
    async def run() -> RecordingConnection:
        conn = RecordingConnection()
        session = session_over(conn)
        session.gather(JobResults(comp_id=1, results=[entry(1, 0)]), [], SIZE, LIMIT)
        session.send_gathered_soon()
        assert conn.calls == []
        await asyncio.sleep(0)  # one loop turn
        return conn

    assert len(asyncio.run(run()).calls) == 1


def inc(n: int) -> int:
    return n + 1


@pytest.mark.slow
def test_a_burst_of_short_jobs_through_the_scheduler_ends_each_job_once(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    # Many results per node message and several node messages per read: what the
    # scheduler joins must still end each job once, with its own result and times.
    finished: list[int] = []
    lock = threading.Lock()

    def job_status(job: DispyJob) -> None:
        if job.status == JobStatus.Finished:
            with lock:
                finished.append(job.result)

    count = 2000
    with SharedJobCluster(
        inc,
        scheduler_host=scheduler.address,
        secret_file=str(users["alice"]),
        job_status=job_status,
    ) as cluster:
        jobs = [cluster.submit(n) for n in range(count)]
        assert [job() for job in jobs] == [n + 1 for n in range(count)]
        cluster.wait(timeout=30)
    for job in jobs:
        assert job.status == JobStatus.Finished
        assert job.start_time is not None and job.end_time is not None
        assert job.start_time <= job.end_time
    with lock:
        assert sorted(finished) == [n + 1 for n in range(count)]


def payload(n: int, size: int) -> bytes:
    return bytes([n % 256]) * size


#: The smallest max_message_size a client may give (the size cap before auth).
SMALL_LIMIT = 64 * 1024


@pytest.mark.slow
def test_gathered_results_stay_within_the_clients_max_message_size(
    tmp_path: Path, users: dict[str, Path]
) -> None:
    """Results of 30 KiB to a client taking 64 KiB messages, from two nodes of 4
    CPUs: the nodes send one per message, and the scheduler joins those it reads
    together only up to the client's limit (the client's connection refuses a
    larger frame: it lost the scheduler, and its jobs, before). A result over the
    client's limit is refused on its node, as without a scheduler."""
    count, size = 1000, 30 * 1024
    # Nodes report every 0.1 s: a report read after a node's results leaves them
    # held while the other node's arrive, and join them.
    pulse = ("--pulse_interval", "0.1")
    with (
        LocalCluster(nodes=2, cpus=4) as local,
        SchedulerProcess.owning(tmp_path, local, *pulse) as sched,
        SharedJobCluster(
            payload,
            scheduler_host=sched.address,
            secret_file=str(users["alice"]),
            max_message_size=SMALL_LIMIT,
        ) as cluster,
    ):
        jobs = [cluster.submit(n, size) for n in range(count)]
        results = [job() for job in jobs]
        assert results == [payload(n, size) for n in range(count)]
        assert all(job.status == JobStatus.Finished for job in jobs)
        large = cluster.submit(0, 2 * SMALL_LIMIT)
        assert large() is None and large.status == JobStatus.Terminated
        assert "ResultTooLarge" in large.exception
        again = cluster.submit(1, size)
        assert again() == payload(1, size)  # the session lives on
