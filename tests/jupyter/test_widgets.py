"""The node panel's model: rows folded from cluster_status events of many clusters,
with the nodes' load from AvailInfo events."""

from __future__ import annotations

import threading

import pytest

from dispynb import JobCluster
from dispynb.job import JobStatus
from dispynb.jupyter import display as templates
from dispynb.jupyter.display import nodes_html
from dispynb.jupyter.widgets import NodePanel, NodeTable
from dispynb.node import DispyNode, DispyNodeAvailInfo, NodeStatus
from tests import jobs
from tests.jupyter.helpers import make_job


def node(port: int = 9711, name: str = "n1", cpus: int = 2) -> DispyNode:
    return DispyNode("127.0.0.1", name, cpus, port=port)


def test_table_node_appears_busy_then_done_then_idle_after_close():
    table = NodeTable()
    seen = node()

    table.event(NodeStatus.Initialized, seen, None)
    [row] = table.rows()
    assert (row.name, row.address, row.cpus, row.connected) == (
        "n1",
        "127.0.0.1:9711",
        2,
        True,
    )

    seen.busy = 1
    table.event(JobStatus.Running, seen, make_job(1))
    assert table.rows()[0].busy == 1

    seen.busy, seen.jobs_done = 0, 1
    table.event(JobStatus.Finished, seen, make_job(1))
    table.event(NodeStatus.Closed, seen, None)
    [row] = table.rows()
    assert (row.busy, row.jobs_done, row.connected) == (0, 1, False)


def test_table_adds_up_clusters_using_the_same_node():
    table = NodeTable()
    first, second = node(), node()  # two clusters' views of one node
    first.busy, first.jobs_done = 2, 5
    second.busy, second.jobs_done = 1, 3

    table.event(NodeStatus.Initialized, first, None)
    table.event(NodeStatus.Initialized, second, None)
    [row] = table.rows()
    assert (row.busy, row.jobs_done) == (3, 8)

    table.event(NodeStatus.Closed, first, None)
    [row] = table.rows()
    assert (row.busy, row.jobs_done, row.connected) == (1, 8, True)


def test_table_keeps_order_of_appearance_and_ignores_events_without_node():
    table = NodeTable()
    assert not table.event(JobStatus.Created, None, make_job(1))
    table.event(NodeStatus.Initialized, node(9712, "b"), None)
    table.event(NodeStatus.Initialized, node(9711, "a"), None)

    assert [r.name for r in table.rows()] == ["b", "a"]


def test_panel_widget_value_redrawn_from_events():
    panel = NodePanel(interval=0)
    assert "no nodes yet" in panel.widget.value

    panel.cluster_status(NodeStatus.Initialized, node(name="worker-7"), None)

    assert "worker-7" in panel.widget.value
    assert "127.0.0.1:9711" in panel.widget.value
    assert "worker-7" in panel._repr_html_()
    bundle = panel._repr_mimebundle_()  # HTML: a saved notebook has no widgets
    assert "application/vnd.jupyter.widget-view+json" not in bundle
    assert "worker-7" in bundle["text/html"] and "worker-7" in bundle["text/plain"]


def test_panel_chain_calls_the_user_callback_too():
    panel = NodePanel(interval=0, widget=False)
    seen = []

    callback = panel.chain(lambda *event: seen.append(event))
    callback(NodeStatus.Initialized, node(), None)

    assert len(seen) == 1
    assert len(panel.rows()) == 1
    assert panel.widget is None


def test_nodes_html_escapes_names():
    panel = NodePanel(interval=0, widget=False)
    panel.cluster_status(NodeStatus.Initialized, node(name="<b>"), None)

    assert "&lt;b&gt;" in nodes_html(panel.rows())


def test_nodes_html_names_jobs_done_as_the_lab_panel_does():
    """The column of `DispyNode.jobs_done` (every job that ended on the node,
    cancelled ones too) says 'jobs ended', as the lab panel's 'N ended' does,
    not 'jobs done' beside a run's '0/40 done'."""
    panel = NodePanel(interval=0, widget=False)
    seen = node()
    seen.jobs_done = 3
    panel.cluster_status(NodeStatus.Initialized, seen, None)

    table = nodes_html(panel.rows())
    assert ">jobs ended<" in table and "jobs done" not in table, table
    assert ">3<" in table


def test_panel_text_counts_its_nodes_in_words():
    """A notebook's panel of one node read '<NodePanel 1 nodes>'."""
    panel = NodePanel(interval=0, widget=False)
    panel.cluster_status(NodeStatus.Initialized, node(), None)
    assert repr(panel).startswith("<NodePanel 1 node>\n"), repr(panel)
    panel.cluster_status(NodeStatus.Initialized, node(port=9712), None)
    assert repr(panel).startswith("<NodePanel 2 nodes>\n"), repr(panel)


def test_panel_load_from_avail_info_events():
    panel = NodePanel(interval=0)
    seen = node()
    panel.cluster_status(NodeStatus.Initialized, seen, None)
    [row] = panel.rows()
    assert (row.cpu_free, row.memory_free, row.load_time) == (None, None, None)
    assert "cpu_used=- memory_free=-" in repr(panel)

    seen.avail_info = DispyNodeAvailInfo(63.0, 3 * 1024**3, 10**9, 100.0)
    panel.cluster_status(NodeStatus.AvailInfo, seen, None)

    [row] = panel.rows()
    assert (row.cpu_free, row.memory_free) == (63.0, 3 * 1024**3)
    assert row.load_time is not None
    assert "CPU used" in panel.widget.value and "memory free" in panel.widget.value
    assert ">37%<" in panel.widget.value and ">3.0 GB<" in panel.widget.value
    assert ">37%<" in panel._repr_html_()
    assert "cpu_used=37% memory_free=3.0 GB" in repr(panel)

    # The node cannot read its figures now (out of descriptors): unknown, not
    # the last ones it could read.
    seen.avail_info = None
    panel.cluster_status(NodeStatus.AvailInfo, seen, None)
    [row] = panel.rows()
    assert (row.cpu_free, row.memory_free, row.load_time) == (None, None, None)
    assert "cpu_used=- memory_free=-" in repr(panel)


@pytest.mark.slow
def test_panel_shows_node_load_after_avail_info_events(local):
    panel = NodePanel(interval=0)
    pulses = threading.Event()

    def cluster_status(status: int, node: object, job: object) -> None:
        if status == NodeStatus.AvailInfo:
            pulses.set()

    with JobCluster(
        jobs.square,
        nodes=local,
        pulse_interval=0.2,
        cluster_status=panel.chain(cluster_status),
    ) as cluster:
        assert pulses.wait(jobs.WAIT)
        [row] = panel.rows()
        [known] = cluster.status().nodes
        assert known.avail_info is not None
        assert row.cpu_free is not None and 0.0 <= row.cpu_free <= 100.0
        assert row.memory_free is not None and row.memory_free > 0
        assert row.connected
        assert templates.format_bytes(row.memory_free) in panel.widget.value
        assert templates.format_load(row.cpu_free) in panel.widget.value
        summary = templates.cluster_html(cluster)
        assert "memory free" in summary
        assert templates.format_bytes(known.avail_info.memory) in summary


def test_a_node_that_left_is_greyed_as_gone_then_dropped(monkeypatch):
    import dispynb.jupyter.widgets as widgets

    now = [1000.0]
    monkeypatch.setattr(widgets.time, "time", lambda: now[0])
    table = NodeTable()
    dead, other = node(9711, "dead"), node(9712, "other")
    table.event(NodeStatus.Initialized, dead, None)
    table.event(NodeStatus.Initialized, other, None)
    dead.busy = 2
    table.event(NodeStatus.Closed, dead, None, lost=True)  # it died mid-run
    rows = {row.name: row for row in table.rows()}
    assert (rows["dead"].state, rows["dead"].busy) == ("gone", 0)
    assert rows["other"].state == "in use"
    html = nodes_html(table.rows())
    assert html.count("dispynb-gone") == 1 and ">gone<" in html

    now[0] += widgets.GONE_SHOWN + 1
    assert [row.name for row in table.rows()] == ["other"]


def test_nodes_no_longer_in_use_are_gone_and_a_returning_node_is_back(monkeypatch):
    import dispynb.jupyter.widgets as widgets

    now = [1000.0]
    monkeypatch.setattr(widgets.time, "time", lambda: now[0])
    table = NodeTable()
    old, new = node(9711, "local-0"), node(9799, "local-0")
    table.event(NodeStatus.Initialized, old, None)
    table.event(NodeStatus.Closed, old, None)  # its cluster closed: idle, not gone
    assert [row.state for row in table.rows()] == ["idle"]
    table.in_use(["127.0.0.1:9799"])  # %dispy local again: replaced
    table.event(NodeStatus.Initialized, new, None)
    assert [(row.address, row.state) for row in table.rows()] == [
        ("127.0.0.1:9711", "gone"),
        ("127.0.0.1:9799", "in use"),
    ]
    table.event(NodeStatus.Initialized, old, None)  # the same address serves again
    assert table.rows()[0].state == "in use"
    table.in_use(["127.0.0.1:9799"])
    now[0] += widgets.GONE_SHOWN + 1
    assert [row.address for row in table.rows()] == ["127.0.0.1:9799"]
