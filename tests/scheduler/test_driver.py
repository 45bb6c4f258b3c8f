"""`Driver` against in-process node servers, on the test's loop: no subprocess.

The nodes are real `NodeServer` objects on 127.0.0.1 (`tests.inprocess`), whose
computations run in thread stand-ins; one test uses a hostile node made of the
product's own `Listener`, to send what a node never should.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dispynb.defaults import MAX_JOBS_PER_CPU, MAX_MESSAGE_SIZE, MIN_JOBS_PER_CPU
from dispynb.depends import FileRef
from dispynb.errors import AuthenticationError, DispynbError, SetupError
from dispynb.protocol import serialize
from dispynb.protocol.framing import Buffer
from dispynb.protocol.messages import (
    CRASHED,
    FINISHED,
    RAISED,
    TERMINATED,
    ComputationReady,
    ComputationSetup,
    Error,
    FileFromNode,
    JobResults,
    JobSubmit,
    ResultChunk,
    ResultsJournaled,
    Welcome,
)
from dispynb.scheduler.driver import Driver, DriverConfig, NodeLink, Outcome
from dispynb.scheduler.state import SchedulerState
from dispynb.transport.connection import Connection
from dispynb.transport.listener import Listener
from nodeserver.sessionrecovery import _SessionRecovery
from tests.asyncutil import run
from tests.inprocess import SECRET, gate, in_process_node, wait_gate, wait_until


def square(x: int) -> int:
    return x * x


def blocked(name: str) -> str:
    return wait_gate(name)


def setup_fails() -> int:
    raise OSError("no such data file")


class Events:
    """Records what the driver tells the cluster (`JobEvents`)."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.done: dict[int, Outcome] = {}
        self.done_on: dict[int, str] = {}
        self.running: dict[int, str] = {}
        self.abandoned: dict[int, str] = {}
        self.cancelled: list[int] = []
        self.requeued: list[int] = []
        self.ready: list[str] = []
        self.failed: list[DispynbError] = []
        self.closed: list[tuple[str, str]] = []
        self.files: list[str] = []
        self.in_flight = 0
        # The product's own count of jobs on a node, read when jobs are sent (set
        # `state` to the driver's SchedulerState to record it).
        self.state: SchedulerState | None = None
        self.max_node_in_flight = 0
        self.batches = 0  # `batch` blocks entered
        self.depth = 0  # inside this many now
        self.done_in_batch: dict[int, int] = {}  # job key: the batch it ended in

    def jobs_sent(self, keys: list[int], node: NodeLink) -> None:
        self.log.append(("sent", keys))
        self.in_flight += len(keys)
        if self.state is not None:
            running = self.state.node_running(node.node_id)
            assert set(keys) <= set(self.state.running_keys(node.node_id))
            self.max_node_in_flight = max(self.max_node_in_flight, running)

    def job_running(self, key: int, node: NodeLink, start_time: float) -> None:
        assert key not in self.done, f"job {key} started after it ended"
        self.log.append(("running", key))
        self.running[key] = node.node_id

    def job_done(self, key: int, node: NodeLink | None, outcome: Outcome) -> None:
        assert key not in self.done, f"job {key} ended twice"
        self.log.append(("done", key))
        self.in_flight -= 1
        self.done[key] = outcome
        self.done_on[key] = node.node_id if node is not None else ""
        if self.depth:
            self.done_in_batch[key] = self.batches

    def job_provisional(self, key: int, node: NodeLink, result: Any) -> None:
        self.log.append(("provisional", key))

    def job_file(
        self, key: int, node: NodeLink, path: str, data: list[memoryview]
    ) -> None:
        self.files.append(path)

    def job_abandoned(
        self, key: int, node: NodeLink | None, reason: str, node_id: str = ""
    ) -> None:
        self.abandoned[key] = reason

    def job_cancelled(self, key: int) -> None:
        self.cancelled.append(key)

    def job_requeued(self, key: int) -> None:
        self.in_flight -= 1
        self.requeued.append(key)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        self.batches += 1
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def node_ready(self, node: NodeLink) -> None:
        self.ready.append(node.node_id)

    def node_failed(self, node: NodeLink, error: DispynbError) -> None:
        self.failed.append(error)

    def node_closed(self, node: NodeLink, reason: str) -> None:
        self.closed.append((node.node_id, reason))

    def node_status(self, node: NodeLink, avail: list[float]) -> None:
        pass


def allocate_for(
    func: Any, **extra: Any
) -> Callable[[Welcome, str], tuple[int, list[Buffer], list[FileRef]]]:
    spec = {"func": func, "setup": None, "cleanup": None, "setup_args": (), **extra}

    def allocate(
        welcome: Welcome, peer_ip: str
    ) -> tuple[int, list[Buffer], list[FileRef]]:
        return welcome.cpus, serialize.dumps(spec), []

    return allocate


@contextlib.asynccontextmanager
async def driving(
    secret: bytes = SECRET, **options: Any
) -> AsyncIterator[tuple[Driver, Events]]:
    """A driver of computation 1 (closed, its connections and tasks ended, on exit)."""
    events = Events()
    driver = Driver(
        DriverConfig(
            comp_id=1,
            name="test",
            secret=secret,
            max_message_size=MAX_MESSAGE_SIZE,
            client_name="driver-test",
            **options,
        ),
        events,
    )
    try:
        yield driver, events
    finally:
        await driver.close(terminate=True)


def submit(driver: Driver, key: int, *args: Any) -> None:
    driver.enqueue(key, serialize.dumps((args, {})))
    driver.drain()


def test_submit_and_results(tmp_path: Path) -> None:
    async def main() -> None:
        async with in_process_node(tmp_path, cpus=2) as node, driving() as (d, ev):
            d.add_node("127.0.0.1", node.port, allocate_for(square))
            await wait_until(lambda: ev.ready, "node ready")
            (link,) = d.nodes.values()
            assert link.cpus == 2 and link.welcome is not None
            assert link.welcome.name == "inproc"
            for key in range(1, 41):
                submit(d, key, key)
            submit(d, 41, "text")  # the function raises on the node
            await wait_until(lambda: len(ev.done) == 41, "all results")
            assert {k: ev.done[k].result for k in range(1, 41)} == {
                k: k * k for k in range(1, 41)
            }
            assert all(ev.done[k].outcome == FINISHED for k in range(1, 41))
            assert ev.done[41].outcome == RAISED
            assert "TypeError" in (ev.done[41].exception or "")
            # Each job was reported running before it was reported done.
            for key in range(1, 42):
                assert ev.log.index(("running", key)) < ev.log.index(("done", key))
            assert link.jobs_done == 41

    run(main())


def test_the_results_of_one_message_end_in_one_batch(tmp_path: Path) -> None:
    """Each job ends inside a `JobEvents.batch`, one per results message (the
    cluster journals a batch's ends in one transaction)."""

    async def main() -> None:
        async with in_process_node(tmp_path, cpus=2) as node, driving() as (d, ev):
            d.add_node("127.0.0.1", node.port, allocate_for(square))
            await wait_until(lambda: ev.ready, "node ready")
            for key in range(1, 41):
                submit(d, key, key)
            await wait_until(lambda: len(ev.done) == 40, "all results")
            assert set(ev.done_in_batch) == set(range(1, 41))
            assert ev.depth == 0

    run(main())


@pytest.mark.parametrize("offered", [True, False])
def test_journaled_results_are_acknowledged_only_to_a_node_that_offers_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offered: bool
) -> None:
    """A cluster journaling its jobs says which results it journaled, after each
    results message, to a node whose `ComputationReady` offered it; to a node that
    predates it (no offer), nothing: it would refuse the message."""
    heard: list[list[int]] = []

    def on_journaled(session: Any, message: ResultsJournaled, buffers: Any) -> None:
        heard.extend(message.jobs)

    monkeypatch.setattr(_SessionRecovery, "_on_journaled", on_journaled)
    if not offered:
        monkeypatch.setattr(_SessionRecovery, "_acks_journaled", lambda s, c: False)

    async def main() -> None:
        async with (
            in_process_node(tmp_path, cpus=2) as node,
            driving(recovery_id="rid", keep_results=60.0, keep_sent=True) as (d, ev),
        ):
            d.add_node("127.0.0.1", node.port, allocate_for(square))
            await wait_until(lambda: ev.ready, "node ready")
            for key in range(1, 21):
                submit(d, key, key)
            await wait_until(lambda: len(ev.done) == 20, "all results")
        # Closed: the node has handled every message sent before the close.
        if offered:
            assert sorted(key for key, _attempt in heard) == list(range(1, 21))
        else:
            assert heard == []

    run(main())


def test_wrong_secret_and_failed_setup_reject_the_node(tmp_path: Path) -> None:
    async def main() -> None:
        async with in_process_node(tmp_path) as node:
            async with driving(secret=b"not-the-secret") as (d, ev):
                await d.add_node("127.0.0.1", node.port, allocate_for(square))
                assert len(ev.failed) == 1
                assert isinstance(ev.failed[0], AuthenticationError)
                assert d.nodes == {}
                submit(d, 1, 2)  # no node left, none coming: abandoned at once
                assert "no node" in ev.abandoned[1]
            async with driving() as (d, ev):
                allocate = allocate_for(square, setup=setup_fails)
                await d.add_node("127.0.0.1", node.port, allocate)
                (error,) = ev.failed
                assert isinstance(error, SetupError)
                assert "no such data file" in str(error)
                assert "setup_fails" in (error.remote_traceback or "")

    run(main())


def test_cancel_running_and_waiting_jobs(tmp_path: Path) -> None:
    async def main() -> None:
        async with in_process_node(tmp_path, cpus=1) as node, driving() as (d, ev):
            d.add_node("127.0.0.1", node.port, allocate_for(blocked))
            await wait_until(lambda: ev.ready, "node ready")
            name = f"driver-cancel-{id(d)}"
            for key in (1, 2, 3):  # one runs, one waits on the node, one here
                submit(d, key, name)
            await wait_until(lambda: 1 in ev.running, "job 1 running")
            d.cancel(3)
            assert ev.cancelled == [3]  # never sent: cancelled at once
            d.cancel(2)
            await wait_until(lambda: 2 in ev.done, "job 2 settled")
            assert ev.done[2].outcome == "cancelled"  # it never started
            d.cancel(1)
            await wait_until(lambda: 1 in ev.done, "job 1 settled")
            assert ev.done[1].outcome == TERMINATED
            assert "at the client's request" in (ev.done[1].exception or "")
            gate(name).set()
            submit(d, 4, name)  # the node goes on with the next job
            await wait_until(lambda: 4 in ev.done, "job 4 done")
            assert ev.done[4].result == name

    run(main())


def test_node_vanishing_mid_job_abandons_it(tmp_path: Path) -> None:
    async def main() -> None:
        async with in_process_node(tmp_path, cpus=1) as node, driving() as (d, ev):
            d.add_node("127.0.0.1", node.port, allocate_for(blocked))
            await wait_until(lambda: ev.ready, "node ready")
            name = f"driver-vanish-{id(d)}"
            submit(d, 1, name)
            await wait_until(lambda: 1 in ev.running, "job 1 running")
            node.vanish()
            await wait_until(lambda: 1 in ev.abandoned, "job 1 abandoned")
            assert "was lost" in ev.abandoned[1]
            assert ev.closed and ev.closed[0][0] == f"127.0.0.1:{node.port}"
            assert 1 not in ev.done
            gate(name).set()

    run(main())


def test_reentrant_job_moves_to_another_node_when_its_node_vanishes(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with (
            in_process_node(tmp_path / "a", cpus=1, name="a") as a,
            in_process_node(tmp_path / "b", cpus=1, name="b") as b,
            driving(reentrant=True) as (d, ev),
        ):
            for node in (a, b):
                d.add_node("127.0.0.1", node.port, allocate_for(blocked))
            await wait_until(lambda: len(ev.ready) == 2, "both nodes ready")
            name = f"driver-move-{id(d)}"
            submit(d, 1, name)
            await wait_until(lambda: 1 in ev.running, "job 1 running")
            first = ev.running[1]
            lost, other = (a, b) if first.endswith(f":{a.port}") else (b, a)
            lost.vanish()
            await wait_until(lambda: ev.requeued == [1], "job 1 requeued")
            gate(name).set()
            await wait_until(lambda: 1 in ev.done, "job 1 done elsewhere")
            assert ev.done[1].outcome == FINISHED and ev.done[1].result == name
            assert ev.done_on[1] == f"127.0.0.1:{other.port}"
            assert 1 not in ev.abandoned

    run(main())


def test_jobs_in_flight_per_node_are_bounded(tmp_path: Path) -> None:
    async def main() -> None:
        async with in_process_node(tmp_path, cpus=1) as node, driving() as (d, ev):
            ev.state = d.state
            d.add_node("127.0.0.1", node.port, allocate_for(blocked))
            await wait_until(lambda: ev.ready, "node ready")
            name = f"driver-window-{id(d)}"
            for key in range(1, 51):
                submit(d, key, name)
            await wait_until(lambda: 1 in ev.running, "job 1 running")
            # Jobs of unknown length: one running and one waiting per CPU; the
            # rest wait at the client (back-pressure on the node's queue).
            assert ev.in_flight == MIN_JOBS_PER_CPU
            gate(name).set()
            await wait_until(lambda: len(ev.done) == 50, "all done")
            # The bound is on what the node holds, as the scheduler counts it when
            # it sends. Not from the events: a results message tells job_done after
            # the replacements it frees are sent (bc4c50a), so sent-minus-done
            # passes over the bound by that message's results for a moment.
            assert 0 < ev.max_node_in_flight <= MAX_JOBS_PER_CPU
            finished = [e[1] for e in ev.log if e[0] == "done"]
            assert finished == list(range(1, 51))  # one CPU: in submission order

    run(main())


class HostileNode:
    """A node made of the product's `Listener` that sends what no node should."""

    def __init__(self) -> None:
        self.submitted: asyncio.Future[list[list[Any]]] | None = None
        self.listener = Listener(
            self._serve,
            secret=SECRET,
            make_welcome=lambda: Welcome(
                name="hostile",
                cpus=1,
                platform="test",
                address="127.0.0.1:0",
                max_message_size=MAX_MESSAGE_SIZE,
                pid=1,
            ),
            max_message_size=MAX_MESSAGE_SIZE,
        )
        self.port = self.listener.listen_on("127.0.0.1", 0)
        self.sent_all = asyncio.Event()

    async def _serve(self, conn: Connection, client: str) -> None:
        setup, _ = await conn.recv()
        assert isinstance(setup, ComputationSetup)
        conn.write(ComputationReady(comp_id=setup.comp_id, workers=1))
        submit_message, _ = await conn.recv()
        assert isinstance(submit_message, JobSubmit)
        (key, attempt, _count) = submit_message.jobs[0]
        comp = setup.comp_id

        def result(k: int, outcome: str, buffers: int, exc: str = "") -> list[Any]:
            return [k, attempt, outcome, 1.0, 2.0, "", "", exc, buffers]

        # A result for a job it was never given, and a stale attempt of ours.
        conn.write(JobResults(comp_id=comp, results=[result(999, FINISHED, 0)]))
        stale = [key, attempt + 7, FINISHED, 1.0, 2.0, "", "", None, 0]
        conn.write(JobResults(comp_id=comp, results=[stale]))
        # A file for a job it does not run, and a chunk far over any limit.
        conn.write(FileFromNode(comp_id=comp, key=999, path="x.txt"), [b"data"])
        conn.write(
            ResultChunk(
                comp_id=comp,
                key=key,
                attempt=attempt,
                index=0,
                offset=0,
                size=1 << 62,
            ),
            [b"x"],
        )
        conn.write(Error(code="x", message="nonsense from the node"))
        # Its one real result, whose bytes do not unpickle.
        conn.write(
            JobResults(comp_id=comp, results=[result(key, FINISHED, 1)]),
            [b"\x80\x05garbage"],
        )
        self.sent_all.set()
        with contextlib.suppress(DispynbError):
            await conn.recv()  # until the client closes

    def stop(self) -> None:
        self.listener.stop()


def test_nonsense_from_a_node_loses_nothing_and_trusts_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        hostile = HostileNode()
        try:
            async with driving() as (d, ev):
                d.add_node("127.0.0.1", hostile.port, allocate_for(square))
                await wait_until(lambda: ev.ready, "hostile node ready")
                submit(d, 1, 3)
                await wait_until(lambda: 1 in ev.done, "job 1 settled")
                assert list(ev.done) == [1]  # nothing for the job it never got
                assert ev.files == []  # the unasked-for file was not saved
                assert ev.done[1].outcome == CRASHED
                assert "cannot be unpickled here" in (ev.done[1].exception or "")
                assert d.nodes  # the node is still in use
        finally:
            hostile.stop()

    run(main())


def test_a_vanished_node_that_comes_back_is_used_again(tmp_path: Path) -> None:
    async def main() -> None:
        async with in_process_node(tmp_path, cpus=1) as node, driving() as (d, ev):
            d.add_node("127.0.0.1", node.port, allocate_for(square))
            await wait_until(lambda: ev.ready, "node ready")
            node.vanish()
            await wait_until(lambda: ev.closed, "node lost")
            assert d.nodes == {}
            await node.server.resume()  # back on the same port
            await wait_until(lambda: len(ev.ready) == 2, "set up again")
            submit(d, 1, 5)
            await wait_until(lambda: 1 in ev.done, "job 1 done")
            assert ev.done[1].result == 25
            assert node.server.clients_accepted == 2

    run(main())
