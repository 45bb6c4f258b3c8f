"""The node panel's model: rows folded from cluster_status events of many clusters."""

from __future__ import annotations

from dispynb.job import JobStatus
from dispynb.jupyter.display import nodes_html
from dispynb.jupyter.widgets import NodePanel, NodeTable
from dispynb.node import DispyNode, NodeStatus
from tests.jupyter.helpers import make_job


def node(port: int = 9711, name: str = "n1", cpus: int = 2) -> DispyNode:
    return DispyNode("127.0.0.1", port, name=name, cpus=cpus)


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
    bundle = panel._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "worker-7" in bundle["text/html"]


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
