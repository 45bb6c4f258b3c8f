"""The panel's link in the kernel (`dispynb.jupyter.labcomm.LabLink`), with a fake
comm: every request answered, errors short, the link's life (opened and closed by
the comm target, at most `MAX_LINKS`, stopped when a send fails) and the context
its messages are sent in."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from typing import Any

import pytest

from dispynb.jupyter import labcomm
from dispynb.jupyter.labcomm import ClusterTracker, Discovered, LabLink
from tests.jupyter.fakecomm import INTERVAL, FakeComm


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
