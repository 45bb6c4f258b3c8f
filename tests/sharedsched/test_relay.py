"""The scheduler passes a client's job message, and a node's results, on as they
came (`Connection.relay`) only when nothing in them changes; otherwise it encodes
what the other side must get (`SharedComputation.send_jobs`, `to_client`)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from dispynb.protocol.framing import PREFIX_SIZE, encode_frames
from dispynb.protocol.messages import (
    RETURNED,
    ComputationSetup,
    JobResults,
    JobsPlaced,
    JobSubmit,
    Message,
    NodeStatus,
    pack_header,
)
from schedserver.computation import SharedComputation, Upstream
from schedserver.server import NodeState
from schedserver.session import SchedulerSession
from schedserver.spill import UserKept

FRAME: Any = (b"prefix", 2, memoryview(b"as the peer sent it"))


class RecordingConnection:
    """What is written to a peer: ``("relay", frame)`` or ``("write", message)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        #: `JobsPlaced` messages to a client, apart: they name where jobs went.
        self.placed: list[JobsPlaced] = []
        self.messages_waiting = 0
        self.last_frame: Any = FRAME
        self.last_size = 100  # of the last message read (a small one)

    def relay(self, frame: Any) -> None:
        self.calls.append(("relay", frame))

    def write(self, message: Message, buffers: Any = ()) -> None:
        if isinstance(message, JobsPlaced):
            self.placed.append(message)
        else:
            self.calls.append(("write", message))

    def write_many(self, messages: Any) -> None:
        for message, buffers in messages:
            self.write(message, buffers)


def computation(
    comp_id: int = 5,
) -> tuple[SharedComputation, Upstream, RecordingConnection, RecordingConnection]:
    """A computation of a session, with an upstream to one node (2 CPUs)."""
    client = RecordingConnection()
    server: Any = SimpleNamespace(
        config=SimpleNamespace(
            pulse_interval=1.0, max_queued=None, max_kept=1 << 20, max_user_args=0
        ),
        # What a user keeps in all (--max_user_kept): no limit here.
        spill=SimpleNamespace(user=lambda name: UserKept(name, 0)),
        job_left=lambda comp, node: None,
        schedule=lambda: None,
        schedule_soon=lambda: None,
    )
    server.write = lambda upstream, message, buffers=None: upstream.conn.write(
        message, buffers or ()
    )
    session = SchedulerSession(client, server, "alice")  # type: ignore[arg-type]
    setup = ComputationSetup(comp_id=comp_id, name="c", workers=0)
    comp = SharedComputation(server, session, setup, [], 1)
    node_conn = RecordingConnection()
    node = NodeState("127.0.0.1", 9000, cpus=2, alive=True)
    upstream = Upstream(node, conn=node_conn, ready=True)  # type: ignore[arg-type]
    comp.upstream[node.name] = upstream
    return comp, upstream, client, node_conn


def submit(comp: SharedComputation, keys: list[int], limits: Any = ()) -> None:
    message = JobSubmit(
        comp_id=comp.client_comp_id,
        jobs=[[key, 0, 1] for key in keys],
        limits=[list(item) for item in limits],
    )
    comp.submit(message, [memoryview(b"%d" % key) for key in keys], FRAME)


def take_all(comp: SharedComputation, upstream: Upstream) -> None:
    jobs = list(comp.queue)
    comp.queue.clear()
    comp.send_jobs(upstream, jobs)


def test_a_job_message_sent_on_whole_goes_as_it_came() -> None:
    async def run() -> None:
        comp, upstream, _client, node = computation()
        submit(comp, [1, 2], limits=[[2, 5.0, None]])
        take_all(comp, upstream)
        comp.submitted()
        assert node.calls == [("relay", FRAME)]
        assert set(comp.running) == {1, 2}

    asyncio.run(run())


def test_a_job_message_is_encoded_again_when_what_the_node_gets_differs() -> None:
    async def run() -> None:
        comp, upstream, _client, node = computation()
        # a limit for a job it does not carry: the node gets the jobs' only
        submit(comp, [1], limits=[[1, 5.0, None], [9, 1.0, None]])
        take_all(comp, upstream)
        comp.submitted()
        # jobs queued before it: they go with it
        comp.queue.clear()
        submit(comp, [2])
        comp.submitted()
        submit(comp, [3])
        take_all(comp, upstream)
        comp.submitted()
        # only some of its jobs go to this node
        submit(comp, [4, 5])
        first = comp.queue.popleft()
        comp.send_jobs(upstream, [first])
        comp.submitted()
        # sent later, by another dispatch: its frame went
        take_all(comp, upstream)
        sent = [message for kind, message in node.calls if kind == "write"]
        assert len(sent) == len(node.calls) == 4
        assert [m.jobs for m in sent] == [
            [[1, 0, 1]],
            [[2, 0, 1], [3, 0, 1]],
            [[4, 0, 1]],
            [[5, 0, 1]],
        ]
        assert sent[0].limits == [[1, 5.0, None]]

    asyncio.run(run())


def test_a_recovered_computation_gets_its_messages_with_the_clients_id() -> None:
    async def run() -> None:
        comp, upstream, client, node = computation()
        comp.client_comp_id = 8  # the client came back with another id
        submit(comp, [1])
        take_all(comp, upstream)
        comp.submitted()
        comp.on_results(
            upstream,
            JobResults(comp_id=5, results=[[1, 0, 1, 1.0, 2.0, "", "", "", 1]]),
            [memoryview(b"r")],
        )
        assert [kind for kind, _ in node.calls + client.calls] == ["write", "write"]
        assert node.calls[0][1].comp_id == 5
        assert client.calls[0][1].comp_id == 8
        # Where the job went, told before it went, with the client's id too.
        assert client.placed == [
            JobsPlaced(comp_id=8, node="127.0.0.1:9000", keys=[1], attempts=[0])
        ]

    asyncio.run(run())


def test_results_go_on_as_the_node_sent_them_unless_a_job_came_back() -> None:
    async def run() -> None:
        comp, upstream, client, _node = computation()
        submit(comp, [1, 2])
        take_all(comp, upstream)
        comp.on_results(
            upstream,
            JobResults(comp_id=5, results=[[1, 0, 1, 1.0, 2.0, "", "", "", 1]]),
            [memoryview(b"r")],
        )
        assert client.calls == [("relay", FRAME)]
        # job 2 is handed back unrun (its node shuts down): it runs again, and the
        # client hears nothing of it
        comp.on_results(
            upstream,
            JobResults(
                comp_id=5,
                results=[[2, 0, RETURNED, 0.0, 0.0, "", "", "", 0]],
                started=[[2, 0, 1.5, 0]],
            ),
            [],
        )
        assert len(client.calls) == 2
        kind, message = client.calls[1]
        assert kind == "write" and message.results == []
        assert [job.key for job in comp.queue] == [2]

    asyncio.run(run())


def frame_of(message: Message, buffers: list[bytes]) -> Any:
    """``message`` as `Connection.last_frame` gives it: (prefix, count, signed)."""
    head, parts = encode_frames([pack_header(message.to_header()), *buffers])
    body = head[PREFIX_SIZE:] + b"".join(bytes(p) for p in parts)
    return head[:PREFIX_SIZE], len(parts), memoryview(body)


def test_results_go_to_the_client_before_they_are_decoded_only_if_unchanged() -> None:
    async def run() -> None:
        comp, upstream, client, _node = computation()
        submit(comp, [1, 2, 3])
        take_all(comp, upstream)
        done = JobResults(comp_id=5, results=[[1, 0, 1, 1.0, 2.0, "", "", "", 1]])
        frame = frame_of(done, [b"r"])
        # read with others: gathered with them, not passed on
        comp.pass_on(upstream, frame, 1)
        # not results; a job handed back: decoded first
        comp.pass_on(upstream, frame_of(NodeStatus(avail=[1.0]), []), 0)
        back = JobResults(comp_id=5, results=[[3, 0, RETURNED, 0, 0, "", "", "", 0]])
        comp.pass_on(upstream, frame_of(back, []), 0)
        assert client.calls == []
        comp.pass_on(upstream, frame, 0)
        assert client.calls == [("relay", frame)]
        # decoded after: bookkeeping only, nothing sent twice
        comp.on_results(upstream, done, [memoryview(b"r")])
        assert client.calls == [("relay", frame)]
        assert set(comp.running) == {2, 3}
        comp.on_results(upstream, back, [])
        assert [job.key for job in comp.queue] == [3]
        assert len(client.calls) == 1

    asyncio.run(run())


def test_starts_that_are_not_starts_are_passed_over() -> None:
    """A node's garbage among the starts (the schema checks only that each is a
    list) is passed over; the real start marks its job started (before: [1], for
    a job that runs, raised IndexError in the scheduler's handler)."""

    async def run() -> None:
        comp, upstream, _client, _node = computation()
        submit(comp, [1])
        take_all(comp, upstream)
        garbage: list[Any] = [[], [1], "x", None, [1, 0], [1, 0, 1.5, "0"]]
        comp.on_results(
            upstream, JobResults(comp_id=5, results=[], started=garbage), []
        )
        assert not comp.running[1].started
        comp.on_results(
            upstream, JobResults(comp_id=5, results=[], started=[[1, 0, 1.5, 0]]), []
        )
        assert comp.running[1].started

    asyncio.run(run())


def test_results_whose_lengths_do_not_add_up_are_not_passed_on() -> None:
    # A node's frame is signed, but its lengths table may be wrong (a bug, a
    # hostile node): the client, which cuts the frame the same way, must not get
    # it; decoding it afterwards (`Connection._take`) says what is wrong.
    async def run() -> None:
        comp, upstream, client, _node = computation()
        submit(comp, [1])
        take_all(comp, upstream)
        done = JobResults(comp_id=5, results=[[1, 0, 1, 1.0, 2.0, "", "", "", 1]])
        prefix, count, body = frame_of(done, [b"r"])
        for bad in (bytes(body) + b"x", bytes(body)[:-1]):
            comp.pass_on(upstream, (prefix, count, memoryview(bad)), 0)
        assert client.calls == []
        comp.pass_on(upstream, (prefix, count, body), 0)
        assert client.calls == [("relay", (prefix, count, body))]

    asyncio.run(run())
