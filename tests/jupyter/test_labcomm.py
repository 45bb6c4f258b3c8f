"""The JupyterLab panel's kernel side (dispynb.jupyter.labcomm), with a fake comm.

Real clusters on a local node; discovery only by unicast to a fake node on 127.0.0.1
(a broadcast would leave this machine's namespace).
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dispynb import JobCluster, LocalCluster
from dispynb.errors import ConfigurationError
from dispynb.job import JobStatus
from dispynb.jupyter import labcomm
from dispynb.jupyter.labcomm import ClusterTracker, Discovered, LabLink, discover
from dispynb.protocol.discovery import Announce, Ping, decode, encode, new_boot_id
from tests import jobs
from tests.jupyter.helpers import hold_setup, wait_then_return

INTERVAL = 0.05
ROOT = Path(__file__).resolve().parents[2]


class FakeComm:
    """Collects what the kernel sends; stands in for an ipykernel comm."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self.handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        self.fail = False

    def send(self, data: dict[str, Any]) -> None:
        if self.fail:
            raise RuntimeError("kernel shutting down")
        with self._cond:
            self.sent.append((time.monotonic(), data))
            self._cond.notify_all()

    def on_msg(self, handler: Callable[[dict[str, Any]], None]) -> None:
        self.handlers["msg"] = handler

    def on_close(self, handler: Callable[[dict[str, Any]], None]) -> None:
        self.handlers["close"] = handler

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> dict[str, Any]:
        """The first message (sent so far or later) for which predicate holds."""
        seen = 0
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for _, data in self.sent[seen:]:
                    if predicate(data):
                        return data
                seen = len(self.sent)
                left = deadline - time.monotonic()
                if left <= 0:
                    last = [d for _, d in self.sent[-3:]]
                    raise AssertionError(
                        f"no such message in {timeout} s; last: {last}"
                    )
                self._cond.wait(left)

    def states(self) -> list[tuple[float, dict[str, Any]]]:
        with self._cond:
            return [(t, d) for t, d in self.sent if d["type"] == "state"]

    def reply(self, request_id: int, timeout: float = 20) -> dict[str, Any]:
        return self.wait_for(
            lambda d: d["type"] == "reply" and d["id"] == request_id, timeout
        )


def cluster_state(cluster: JobCluster) -> Callable[[dict[str, Any]], bool]:
    def find(predicate: Callable[[dict[str, Any]], bool]) -> Callable[..., bool]:
        def check(data: dict[str, Any]) -> bool:
            if data["type"] != "state":
                return False
            mine = [c for c in data["clusters"] if c["id"] == cluster.uid]
            return bool(mine) and predicate(mine[0])

        return check

    return find  # type: ignore[return-value]


def state_of(cluster: JobCluster, predicate: Callable[[dict[str, Any]], bool]) -> Any:
    return cluster_state(cluster)(predicate)  # type: ignore[operator]


@pytest.fixture(scope="module")
def local() -> Iterator[LocalCluster]:
    with LocalCluster(cpus=2) as nodes:
        yield nodes


@pytest.fixture
def link_of() -> Iterator[Callable[..., tuple[LabLink, FakeComm, ClusterTracker]]]:
    made: list[tuple[LabLink, ClusterTracker]] = []

    def make(
        clusters: Callable[[], list[Any]], **kwargs: Any
    ) -> tuple[LabLink, FakeComm, ClusterTracker]:
        comm = FakeComm()
        tracker = ClusterTracker(clusters)
        kwargs.setdefault("session", lambda: {"kind": "", "nodes": []})
        link = LabLink(
            comm.send,
            tracker=tracker,
            discovered=kwargs.pop("discovered", Discovered()),
            interval=INTERVAL,
            **kwargs,
        )
        made.append((link, tracker))
        return link, comm, tracker

    yield make
    for link, tracker in made:
        link.close()
        tracker.close()


def test_state_shows_progress_nodes_and_throttles(
    local: LocalCluster, tmp_path: Path, link_of: Any
) -> None:
    gate = tmp_path / "gate"
    with JobCluster(wait_then_return, nodes=local) as cluster:
        _, comm, _ = link_of(lambda: [cluster])
        jobs = [cluster.submit(str(gate), i) for i in range(6)]
        first = comm.wait_for(
            state_of(cluster, lambda c: c["counts"]["running"] >= 2 and c["nodes"])
        )
        assert first["protocol"] == labcomm.PROTOCOL
        snap = next(c for c in first["clusters"] if c["id"] == cluster.uid)
        assert "jobs" not in snap  # the panel needs counts and nodes only
        counts = snap["counts"]
        assert counts["total"] == 6 == counts["pending"] + counts["running"]
        (node,) = snap["nodes"]
        assert node["cpus"] == 2 and node["busy"] >= 2  # jobs in flight count too
        assert node["id"] == f"{local.addresses[0][0]}:{local.addresses[0][1]}"
        gate.touch()
        comm.wait_for(state_of(cluster, lambda c: c["counts"]["finished"] == 6))
        assert [job() for job in jobs] == list(range(6))
    times = [t for t, _ in comm.states()]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= INTERVAL * 0.8, gaps  # throttled: one push per poll at most


def _panel_fields(interface: str) -> set[str]:
    """The fields of ``interface`` in labextension/src/protocol.ts: what the panel
    reads of the kernel's state."""
    source = (ROOT / "labextension/src/protocol.ts").read_text()
    found = re.search(rf"export interface {interface} {{(.*?)\n}}", source, re.S)
    assert found, f"no interface {interface} in protocol.ts"
    body = re.sub(r"/\*.*?\*/", "", found.group(1), flags=re.S)
    return set(re.findall(r"^\s*(\w+)\??:", body, re.M))


def _one_job_then_closed(
    local: LocalCluster, link_of: Any
) -> tuple[JobCluster, dict[str, Any], dict[str, Any]]:
    """A cluster the panel follows runs one job and closes: the state once the panel
    saw the job finished on a node that reported its load, and once it is closed."""
    live: list[JobCluster] = []
    _, comm, _ = link_of(lambda: list(live))
    cluster = JobCluster(abs, nodes=local)
    live.append(cluster)
    try:
        cluster.submit(-3)
        cluster.wait()
        # the panel saw it alive (the final counts come from its monitor)
        alive = comm.wait_for(
            state_of(
                cluster,
                lambda c: c["counts"]["finished"] == 1 and c["nodes"][0]["avail"],
            )
        )
    finally:
        cluster.close()
        live.clear()
    return cluster, alive, comm.wait_for(state_of(cluster, lambda c: c["closed"]))


def test_a_run_whose_nodes_run_its_setup_is_shown_starting_under_its_name(
    local: LocalCluster, tmp_path: Path, link_of: Any
) -> None:
    """While the nodes run a run's setup (a model loading), its card bears the
    run's name (``--into``) and says it is starting; it bore the function's name
    and "no nodes connected yet" until the setup ended."""
    from dispynb.jupyter.run import Run
    from dispynb.monitoring import live_clusters

    marker, release = tmp_path / "setup-began", tmp_path / "release"
    _, comm, _ = link_of(live_clusters)
    runs: list[Run] = []

    def run_it() -> None:
        setup = functools.partial(hold_setup, str(marker), str(release))
        runs.append(
            Run.map(jobs.square, range(3), nodes=local, setup=setup, name="preds")
        )

    thread = threading.Thread(target=run_it, daemon=True)
    thread.start()
    try:
        jobs.wait_for_path(marker)
        state = comm.wait_for(
            lambda d: (
                d["type"] == "state" and any(c.get("starting") for c in d["clusters"])
            ),
            timeout=10,
        )
    finally:
        release.touch()
        thread.join(jobs.WAIT)
    (card,) = [c for c in state["clusters"] if c["starting"]]
    assert card["name"] == "preds" and card["nodes"] == [], card
    assert card["counts"]["total"] == 0
    (run,) = runs
    # Started, ran and closed: no longer said to be starting.
    comm.wait_for(
        state_of(
            run.cluster,
            lambda c: c["name"] == "preds" and not c["starting"] and c["closed"],
        )
    )
    assert run.results == [0, 1, 4]


def test_the_state_carries_what_the_panel_reads_and_nothing_more(
    local: LocalCluster, link_of: Any
) -> None:
    """A page closed without closing its comm has each push kept by the server:
    the state holds the fields of protocol.ts's interfaces, no others (before: a
    node's address twice, its traffic, CPU time and platform; a cluster's clock)."""
    cluster, state, final = _one_job_then_closed(local, link_of)
    assert set(state) == _panel_fields("IStateMsg")
    assert set(state["session"]) == _panel_fields("ISession")
    for shown in (state, final):
        (snap,) = [c for c in shown["clusters"] if c["id"] == cluster.uid]
        assert set(snap) == _panel_fields("ICluster")
        assert set(snap["counts"]) == _panel_fields("ICounts")
        (node,) = snap["nodes"]
        # (No node was lost: `lost` is only on those that were.)
        fields = _panel_fields("INode") - {"lost"}
        fields -= {"released"} if shown is state else set()
        assert set(node) == fields
        assert set(node["avail"]) == _panel_fields("INodeAvail")


def test_closed_cluster_keeps_its_final_counts(
    local: LocalCluster, link_of: Any
) -> None:
    cluster, _, final = _one_job_then_closed(local, link_of)
    snap = next(c for c in final["clusters"] if c["id"] == cluster.uid)
    assert snap["counts"]["finished"] == 1 and snap["counts"]["total"] == 1
    # Where it ran, not "no nodes connected yet": its nodes, released.
    (node,) = snap["nodes"]
    assert node["released"] and node["jobs_done"] == 1 and node["busy"] == 0


def test_a_cluster_that_lived_between_two_refreshes_is_shown_closed(
    local: LocalCluster,
) -> None:
    """A run of a few quick jobs may open and close between two polls of the live
    clusters (the panel's refreshes): it must still be shown, closed, with where
    it ran; once, however the refreshes and the close interleave."""
    from dispynb.monitoring import live_clusters

    tracker = ClusterTracker(live_clusters)
    try:
        before = tracker.refresh()
        with JobCluster(abs, nodes=local) as quick:
            jobs = [quick.submit(-i) for i in range(4)]
            quick.wait()
        assert [job() for job in jobs] == [0, 1, 2, 3]
        assert tracker.refresh() != before  # the state changed: the links push
        mine = [c for c in tracker.snapshots() if c["id"] == quick.uid]
        assert len(mine) == 1, mine
        (snap,) = mine
        assert snap["closed"] and snap["name"] == "abs"
        assert snap["counts"]["finished"] == 4 == snap["counts"]["total"]
        (node,) = snap["nodes"]
        assert node["released"] and node["jobs_done"] == 4 and node["busy"] == 0
        # Followed while alive, then closed: still one card.
        with JobCluster(abs, nodes=local) as followed:
            tracker.refresh()
            followed.submit(-1)
            followed.wait()
        tracker.refresh()
        ids = [c["id"] for c in tracker.snapshots()]
        assert ids.count(followed.uid) == 1 and ids.count(quick.uid) == 1, ids
    finally:
        tracker.close()
    # A closed tracker no longer keeps what closes.
    with JobCluster(abs, nodes=local) as later:
        later.submit(-1)
        later.wait()
    assert later.uid not in {c["id"] for c in tracker.snapshots()}


def test_probes_and_clusters_that_ran_nothing_are_never_shown(
    local: LocalCluster, link_of: Any
) -> None:
    from dispynb.jupyter.magics import Session
    from dispynb.monitoring import live_clusters

    _, comm, _ = link_of(live_clusters)
    session = Session()
    session.nodes, session.options = local.node_specs(), {"secret": local.secret}
    empty = JobCluster(abs, nodes=local)
    comm.wait_for(state_of(empty, lambda c: not c["closed"]))
    for _ in range(5):  # what %dispy local / %dispy nodes do: connect, close
        session.probe()
    empty.close()
    with JobCluster(abs, nodes=local) as ran:
        ran.submit(-1)
        ran.wait()
        comm.wait_for(state_of(ran, lambda c: c["counts"]["finished"] == 1))
    comm.wait_for(state_of(ran, lambda c: c["closed"]))
    names = {c["name"] for _, state in comm.states() for c in state["clusters"]}
    assert "_dispynb_node_probe" not in names
    last = comm.states()[-1][1]["clusters"]
    assert empty.uid not in {c["id"] for c in last}  # closed with no job: dropped


def test_cancel_ends_every_unfinished_job(
    local: LocalCluster, tmp_path: Path, link_of: Any
) -> None:
    gate = tmp_path / "never"
    with JobCluster(wait_then_return, nodes=local) as cluster:
        link, comm, _ = link_of(lambda: [cluster])
        jobs = [cluster.submit(str(gate), i) for i in range(5)]
        comm.wait_for(state_of(cluster, lambda c: c["counts"]["running"] >= 2))
        link.on_message(
            {"type": "request", "id": 7, "action": "cancel", "cluster": cluster.uid}
        )
        reply = comm.reply(7)
        assert reply == {"type": "reply", "id": 7, "ok": True, "result": 5}
        for job in jobs:
            job()
        ended = comm.wait_for(
            state_of(
                cluster,
                lambda c: c["counts"]["cancelled"] + c["counts"]["terminated"] == 5,
            )
        )
        snap = next(c for c in ended["clusters"] if c["id"] == cluster.uid)
        assert snap["counts"]["running"] == snap["counts"]["pending"] == 0


def test_cancel_of_a_runs_cluster_counts_its_jobs_cancelled_not_failed(
    local: LocalCluster, tmp_path: Path, link_of: Any
) -> None:
    """The panel's Cancel on the cluster of a run (a %%dispy cell's): its running
    jobs end Terminated, and the run counts them as cancelled, as after Stop (it
    counted them as failures, and printed them as failed jobs); so does the panel."""
    from dispynb.jupyter.run import Run

    gate = tmp_path / "never"
    run = Run(name="gated")
    with JobCluster(wait_then_return, nodes=local, **run.callbacks()) as cluster:
        run.attach(cluster)
        link, comm, _ = link_of(lambda: [cluster])
        for i in range(5):
            run.submit(str(gate), i)
        comm.wait_for(state_of(cluster, lambda c: c["counts"]["running"] >= 2))
        link.on_message(
            {"type": "request", "id": 7, "action": "cancel", "cluster": cluster.uid}
        )
        assert comm.reply(7)["ok"]
        assert run.wait(timeout=30, echo=False)
        # The panel counts them as the cell does: cancelled, none failed (it said
        # 'terminated' of the running ones the Cancel ended).
        comm.wait_for(
            state_of(
                cluster,
                lambda c: (
                    c["counts"]["cancelled"] == 5 and c["counts"]["terminated"] == 0
                ),
            )
        )

    counts = run.counts()
    assert counts.failed == 0 and counts.cancelled == 5, counts
    assert run.failures == []
    assert {job.status for job in run.jobs} >= {JobStatus.Terminated}


def test_bad_requests_get_clear_errors(link_of: Any) -> None:
    link, comm, _ = link_of(list)
    link.on_message({"type": "request", "id": 1, "action": "cancel", "cluster": "zz"})
    assert "no live cluster 'zz'" in comm.reply(1)["error"]
    link.on_message({"type": "request", "id": 2, "action": "explode"})
    error = comm.reply(2)
    assert not error["ok"] and "unknown request 'explode'" in error["error"]
    link.on_message({"type": "request", "id": 3, "action": "cancel"})
    assert comm.reply(3)["error"] == "cancel needs the cluster's id"
    link.on_message({"type": "request", "id": 4, "action": "discover", "addresses": 5})
    assert comm.reply(4)["error"] == "discover needs a list of addresses"
    link.on_message({"type": "request", "id": 5, "action": "nodes"})
    assert comm.reply(5)["result"] == {
        "clusters": [],
        "discovered": [],
        "session": {"kind": "", "nodes": []},
    }


class ExplodingTracker(ClusterTracker):
    """A tracker with a bug: cancelling raises what no request handler expects."""

    def cancel(self, cluster_id: str) -> int:
        raise RuntimeError("the cluster's loop is gone")


def test_every_message_gets_a_reply_and_the_link_goes_on(
    link_of: Any, allow_error_logs: list[logging.LogRecord]
) -> None:
    """Messages that are no request, huge values and a handler's bug each get an
    error reply, short, with the message's id (before: no reply, the panel waited);
    the link then serves the next request."""
    comm = FakeComm()
    tracker = ExplodingTracker(list)
    link = LabLink(
        comm.send,
        tracker=tracker,
        discovered=Discovered(),
        interval=INTERVAL,
        session=lambda: {"kind": "", "nodes": []},
    )
    huge = "x" * 1_000_000
    try:
        link.on_message(["not", "a", "dict"])
        link.on_message({"id": 1, "action": "nodes"})  # no type
        link.on_message({"type": "bogus", "id": 2})
        link.on_message({"type": "request", "id": 3, "action": huge})
        link.on_message({"type": "request", "id": 4, "action": "cancel", "cluster": 7})
        link.on_message(
            {"type": "request", "id": 5, "action": "cancel", "cluster": "c"}
        )
        link.on_message({"type": "request", "id": 6, "action": "nodes"})
        anonymous = comm.wait_for(lambda d: d["type"] == "reply" and d["id"] is None)
        errors = [anonymous] + [comm.reply(n) for n in range(1, 6)]
        assert all(not e["ok"] and len(e["error"]) < 300 for e in errors), errors
        assert "not a request" in errors[0]["error"]
        assert "unknown request 'xxx" in errors[3]["error"]
        assert "RuntimeError: the cluster's loop is gone" in errors[5]["error"]
        assert comm.reply(6)["ok"]
    finally:
        link.close()
        tracker.close()
    assert len(allow_error_logs) == 1  # the bug, with its traceback, once


def test_discoveries_at_once_are_bounded(link_of: Any) -> None:
    """Each running discovery holds a thread and a socket: a flood of Discover
    requests gets errors past MAX_DISCOVERIES, not a thread each."""
    release = threading.Event()

    def slow(addresses: list[str]) -> list[dict[str, Any]]:
        release.wait(20)
        return []

    link, comm, _ = link_of(list, discoverer=slow)
    request = {"type": "request", "action": "discover", "addresses": []}
    count = labcomm.MAX_DISCOVERIES + 3
    try:
        for n in range(count):
            link.on_message({**request, "id": n})
        refused = [comm.reply(n) for n in range(labcomm.MAX_DISCOVERIES, count)]
        assert all("running already" in r["error"] for r in refused), refused
    finally:
        release.set()
    assert all(comm.reply(n)["ok"] for n in range(labcomm.MAX_DISCOVERIES))
    comm.wait_for(lambda d: d["type"] == "state" and not d["discovering"])
    link.on_message({**request, "id": count})
    assert comm.reply(count)["ok"]


class FakeNodeAnnouncer:
    """Answers discovery pings on 127.0.0.1 as a node server would."""

    def __init__(self, name: str = "fake-node", tcp_port: int = 51234) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.name, self.tcp_port = name, tcp_port
        self.pings = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        boot = new_boot_id()
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            message = decode(data)
            if isinstance(message, Ping):
                self.pings += 1
                reply = Announce(
                    name=self.name,
                    port=self.tcp_port,
                    cpus=3,
                    boot=boot,
                    nonce=message.nonce,
                )
                self.sock.sendto(encode(reply), addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def announcer() -> Iterator[FakeNodeAnnouncer]:
    node = FakeNodeAnnouncer()
    yield node
    node.close()


def test_discover_explicit_address(announcer: FakeNodeAnnouncer) -> None:
    found = discover([f"127.0.0.1:{announcer.port}"], timeout=0.5)
    assert found == [
        {"ip_addr": "127.0.0.1", "port": 51234, "name": "fake-node", "cpus": 3}
    ]
    assert announcer.pings == 1


def test_discover_runs_on_the_one_io_loop_also_from_a_running_loop(
    announcer: FakeNodeAnnouncer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The panel's discovery pings from dispynb's I/O loop thread, never from a
    loop of its own, so it also works when called under a running loop (a
    notebook cell), where asyncio.run refuses to start."""
    import asyncio

    from dispynb.transport.discovery import Discovery

    threads: list[str] = []
    start = Discovery.start

    async def recording_start(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return await start(self, *args, **kwargs)

    monkeypatch.setattr(Discovery, "start", recording_start)

    async def cell() -> list[dict[str, object]]:
        return discover([f"127.0.0.1:{announcer.port}"], timeout=0.3)

    found = asyncio.run(cell())
    assert [node["name"] for node in found] == ["fake-node"]
    assert threads == ["dispynb-io"]


def test_discover_rejects_bad_addresses_before_sending() -> None:
    with pytest.raises(ConfigurationError, match="is not an IP"):
        discover(["127.0.0.1:1", "no-such-host"], timeout=0.1)
    with pytest.raises(ConfigurationError, match="at most 256"):
        discover(["127.0.0.1"] * 300, timeout=0.1)


def test_discover_request_replies_and_updates_state(
    announcer: FakeNodeAnnouncer, link_of: Any
) -> None:
    link, comm, _ = link_of(
        list, discoverer=lambda addresses: discover(addresses, timeout=0.3)
    )
    link.on_message(
        {
            "type": "request",
            "id": 9,
            "action": "discover",
            "addresses": [f"127.0.0.1:{announcer.port}"],
        }
    )
    comm.wait_for(lambda d: d["type"] == "state" and d["discovering"])
    reply = comm.reply(9)
    assert reply["ok"] and reply["result"][0]["name"] == "fake-node"
    state = comm.wait_for(
        lambda d: d["type"] == "state" and d["discovered"] and not d["discovering"]
    )
    assert state["discovered"] == reply["result"]
    link.on_message(
        {"type": "request", "id": 10, "action": "discover", "addresses": ["nohost"]}
    )
    assert "discovery failed" in comm.reply(10)["error"]


def test_a_failing_send_stops_the_link(link_of: Any) -> None:
    link, comm, _ = link_of(list)
    comm.wait_for(lambda d: d["type"] == "state")
    comm.fail = True
    link.push_now()
    deadline = time.monotonic() + 10
    while not link.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert link.closed


def test_comm_target_opens_and_closes_links(monkeypatch: pytest.MonkeyPatch) -> None:
    registered: dict[str, Any] = {}

    class Manager:
        def register_target(self, name: str, func: Any) -> None:
            registered[name] = func

    import comm as comm_package

    monkeypatch.setattr(comm_package, "get_comm_manager", Manager)
    monkeypatch.setattr(labcomm, "_magics_session", lambda: {"kind": "", "nodes": []})
    labcomm.register()
    comm = FakeComm()
    registered[labcomm.TARGET](comm, {"content": {"data": {"protocol": 1}}})
    try:
        state = comm.wait_for(lambda d: d["type"] == "state")
        assert state["clusters"] == [] or all("counts" in c for c in state["clusters"])
        comm.handlers["msg"](
            {"content": {"data": {"type": "request", "id": 1, "action": "nodes"}}}
        )
        assert comm.reply(1)["ok"]
    finally:
        comm.handlers["close"]({})
    assert labcomm._links == [] and labcomm._tracker is None


def test_oldest_links_stop_beyond_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labcomm, "_magics_session", lambda: {"kind": "", "nodes": []})
    comms = [FakeComm() for _ in range(labcomm.MAX_LINKS + 2)]
    try:
        for comm in comms:
            labcomm._open(comm, {})
        assert len(labcomm._links) == labcomm.MAX_LINKS
        assert [link.closed for link in labcomm._links] == [False] * labcomm.MAX_LINKS
    finally:
        for comm in comms:
            comm.handlers["close"]({})
    assert labcomm._links == [] and labcomm._tracker is None


_parent: contextvars.ContextVar[str] = contextvars.ContextVar("parent")


def test_pushes_and_replies_run_in_the_comm_handlers_context() -> None:
    """ipykernel picks a comm message's parent (and so the subshell that gets the
    panel's next messages) from the sending context: it must be the handler's."""
    seen: list[str] = []
    sent = threading.Event()

    def send(data: dict[str, Any]) -> None:
        seen.append(_parent.get("none"))
        if data["type"] == "reply":
            sent.set()

    token = _parent.set("comm-open-on-subshell")
    try:
        link = LabLink(
            send,
            tracker=ClusterTracker(list),
            discovered=Discovered(),
            discoverer=lambda addresses: [],
            session=lambda: {"kind": "", "nodes": []},
            interval=INTERVAL,
        )
    finally:
        _parent.reset(token)
    try:
        token = _parent.set("discover-request")
        try:
            link.on_message(
                {"type": "request", "id": 1, "action": "discover", "addresses": []}
            )
        finally:
            _parent.reset(token)
        assert sent.wait(10)
    finally:
        link.close()
    assert seen[0] == "comm-open-on-subshell"  # the first push
    assert "discover-request" in seen  # the reply to the request
    assert "none" not in seen


def test_a_node_lost_while_its_cluster_runs_stays_shown_as_lost(
    link_of: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node killed under a run: the card keeps it for `GONE_SHOWN` seconds,
    marked lost (as ``%dispy panel`` and dispy's monitor show a dead node), with
    the jobs it ended, then drops it. Before, it vanished from the card at once,
    and a run whose only node died read 'no nodes connected yet'."""
    import os
    import signal

    monkeypatch.setattr(labcomm, "GONE_SHOWN", 3.0, raising=False)
    with (
        LocalCluster(nodes=2, cpus=1) as nodes,
        JobCluster(pow, nodes=nodes) as cluster,
    ):
        _, comm, _ = link_of(lambda: [cluster])
        assert [job() for job in [cluster.submit(2, i) for i in range(4)]]
        comm.wait_for(state_of(cluster, lambda c: len(c["nodes"]) == 2))
        os.kill(nodes.pids[1], signal.SIGKILL)
        state = comm.wait_for(
            state_of(cluster, lambda c: any(n.get("released") for n in c["nodes"]))
        )
        snap = next(c for c in state["clusters"] if c["id"] == cluster.uid)
        by_name = {node["name"]: node for node in snap["nodes"]}
        assert set(by_name) == set(nodes.names), snap["nodes"]
        gone = by_name[nodes.names[1]]
        # Said as lost, for the panel to say in words (before: only a name
        # suffix, beside 'released').
        assert gone["lost"] and gone["released"] and gone["busy"] == 0, gone
        assert not by_name[nodes.names[0]].get("released"), snap["nodes"]
        assert not by_name[nodes.names[0]].get("lost"), snap["nodes"]
        # ... for GONE_SHOWN seconds, then it is dropped.
        comm.wait_for(
            state_of(
                cluster, lambda c: [n["name"] for n in c["nodes"]] == [nodes.names[0]]
            ),
            timeout=15,
        )


def test_a_closed_card_keeps_the_node_its_cluster_lost(link_of: Any) -> None:
    """Where a closed run ran includes a node that died under it, marked lost;
    before, the closed card listed only the nodes the cluster still had."""
    import os
    import signal

    with LocalCluster(nodes=2, cpus=1) as nodes:
        cluster = JobCluster(pow, nodes=nodes)
        try:
            _, comm, _ = link_of(lambda: [] if cluster._closed else [cluster])
            assert [job() for job in [cluster.submit(2, i) for i in range(4)]]
            comm.wait_for(state_of(cluster, lambda c: len(c["nodes"]) == 2))
            os.kill(nodes.pids[1], signal.SIGKILL)
            comm.wait_for(
                state_of(cluster, lambda c: any(n.get("released") for n in c["nodes"]))
            )
        finally:
            cluster.close()
        final = comm.wait_for(state_of(cluster, lambda c: c["closed"]))
    snap = next(c for c in final["clusters"] if c["id"] == cluster.uid)
    lost = sorted((node["name"], node.get("lost", False)) for node in snap["nodes"])
    assert lost == [(nodes.names[0], False), (nodes.names[1], True)], snap["nodes"]
    assert all(node["released"] for node in snap["nodes"]), snap["nodes"]


def test_the_nodes_a_closing_cluster_releases_are_not_lost(local: LocalCluster) -> None:
    """A cluster seen by a refresh while it closes (its nodes released, not yet
    gone from the live list): its nodes were marked '(lost)' on its card."""
    cluster = JobCluster(pow, nodes=local)
    tracker = ClusterTracker(lambda: [cluster])
    try:
        assert cluster.submit(2, 3)() == 8
        tracker.refresh()
        (snap,) = tracker.snapshots()
        assert [node["name"] for node in snap["nodes"]] == ["local-0"]
        cluster.close()
        tracker.refresh()  # still listed: the close not seen yet
        (snap,) = tracker.snapshots()
        assert not any(node.get("lost") for node in snap["nodes"]), snap
    finally:
        cluster.close()
        tracker.close()


def test_the_panel_says_which_local_node_of_dispy_local_exited() -> None:
    """One of two ``%dispy local`` nodes killed: the panel's header still said
    '%dispy uses local nodes A, B' while the next cell refused to run ('1 of the
    2 local nodes has exited'). It now marks the node that exited."""
    import os
    import signal

    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "dispynb")
    try:
        with capture_output():
            shell.run_line_magic("dispy", "local --nodes 2 --cpus 1")
        local = shell.magics_manager.registry["DispyMagics"].session.local
        first, second = (f"{host}:{port}" for host, port in local.addresses)
        assert labcomm._magics_session() == {"kind": "local", "nodes": [first, second]}
        os.kill(local.pids[1], signal.SIGKILL)
        jobs.wait_until(lambda: local.exited() != [])
        assert labcomm._magics_session() == {
            "kind": "local",
            "nodes": [first, f"{second} (exited)"],
        }
    finally:
        with capture_output():
            shell.run_line_magic("dispy", "close")
        shell.run_line_magic("unload_ext", "dispynb")
