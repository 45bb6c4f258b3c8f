"""What the JupyterLab panel is shown of this process's clusters: `ClusterTracker`.

The tracker follows each live cluster with a `ClusterMonitor` and keeps the final
card of the last few that closed; `dispynb.jupyter.labcomm` pushes its
`ClusterTracker.snapshots` to each open panel. A snapshot is cut to the fields the
panel reads (`CLUSTER_FIELDS`, `NODE_FIELDS`, `AVAIL_FIELDS`): a page closed
without closing its comm has each push kept by the Jupyter server.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from dispynb import _live
from dispynb.errors import ConfigurationError
from dispynb.jupyter.runstop import run_of, starting_run
from dispynb.jupyter.widgets import GONE_SHOWN
from dispynb.monitoring import ClusterMonitor, live_clusters

#: Closed clusters still shown (their final snapshot), most recent first.
RECENT_CLOSED = 5
#: Names of the clusters dispynb makes for itself (``%dispy`` checking that the
#: nodes answer): never shown.
INTERNAL = frozenset({"_dispynb_node_probe"})
#: Characters of a panel's value quoted back in an error.
SHOWN = 80


class ClusterTracker:
    """A `ClusterMonitor` for each live cluster of the process, shared by links.

    `refresh` attaches monitors to new clusters. A cluster that closes keeps its
    final snapshot (closed) among the `RECENT_CLOSED` most recent, with the nodes it
    last had (marked ``released``). Following the process's clusters (the default
    ``clusters``), the tracker is told of every close as it happens
    (`dispynb._live.add_close_observer`), so a cluster whose whole life fell between
    two refreshes (a few quick jobs) is shown too; otherwise it sees the closes at
    its refreshes. A cluster that closed without a job is not kept, and dispynb's
    own (`INTERNAL`) are never followed. A node that leaves a live cluster (it died,
    was cut off or stopped) stays on its card for `GONE_SHOWN` seconds, marked
    ``lost`` (and ``released``: no load, its figures frozen), as ``%dispy panel``
    shows it. Call `close` when done.
    """

    def __init__(self, clusters: Callable[[], list[Any]] = live_clusters) -> None:
        self._clusters = clusters
        self._lock = threading.Lock()
        self._monitors: dict[int, ClusterMonitor] = {}  # id(cluster) -> monitor
        self._closed: deque[dict[str, Any]] = deque(maxlen=RECENT_CLOSED)
        self._closed_version = 0
        self._nodes: dict[int, list[dict[str, Any]]] = {}  # last nodes seen
        # Per live cluster: its nodes at the last refresh, and those lost since
        # (node id -> (last record, when it went)).
        self._present: dict[int, dict[str, dict[str, Any]]] = {}
        self._lost: dict[int, dict[str, tuple[dict[str, Any], float]]] = {}
        self._lost_version = 0
        # Clusters whose final snapshot is taken: never followed or kept again.
        self._ended: weakref.WeakSet[Any] = weakref.WeakSet()
        # Each card's place among the cards of its name, (cluster id, name) -> n,
        # in the order they came: said beside the name of the earlier ones while
        # cards of one name are shown together (`_labelled`).
        self._places: dict[tuple[str, str], int] = {}
        self._named: dict[str, int] = {}  # name -> cards seen with it
        self._every_cluster = clusters is live_clusters
        if self._every_cluster:
            _live.add_close_observer(self._on_close)

    def refresh(self) -> tuple[Any, ...]:
        """Follow the clusters now alive; return a key that changes with the state."""
        live = {
            id(cluster): cluster
            for cluster in self._clusters()
            if getattr(cluster, "name", "") not in INTERNAL
        }
        with self._lock:
            for key, cluster in live.items():
                if key in self._monitors or cluster in self._ended:
                    continue
                if getattr(cluster, "_closed", False):
                    self._end(key, cluster, None)  # closed since it was listed
                else:
                    self._monitors[key] = ClusterMonitor(cluster)
            for key, monitor in self._monitors.items():
                nodes = monitor.nodes()
                if nodes:
                    self._nodes[key] = [_brief_node(node) for node in nodes]
                # Closing releases the nodes (after setting _closed): not lost.
                if not getattr(monitor.cluster, "_closed", False):
                    self._follow_lost(key, nodes)
            for key in [k for k in self._monitors if k not in live]:
                monitor = self._monitors.pop(key)
                self._end(key, monitor.cluster, monitor)
            return (
                self._closed_version,
                self._lost_version,
                # (Started: no event may follow the last one it had while starting.)
                *(
                    (key, m.version, _starting(m.cluster))
                    for key, m in self._monitors.items()
                ),
            )

    def _follow_lost(self, key: int, nodes: list[dict[str, Any]]) -> None:
        """Note the nodes that left the live cluster ``key`` since the last
        refresh, those back, and those lost longer than `GONE_SHOWN` ago (under
        the lock)."""
        now = time.monotonic()
        present = {node["id"]: _brief_node(node) for node in nodes}
        lost = self._lost.setdefault(key, {})
        before = len(lost)
        for node_id, node in self._present.get(key, {}).items():
            if node_id not in present:
                lost[node_id] = (node, now)
        for node_id in present:
            lost.pop(node_id, None)  # back (or a new node at that address)
        expired = [i for i, (_, when) in lost.items() if now - when > GONE_SHOWN]
        for node_id in expired:
            del lost[node_id]
        if expired or len(lost) != before:
            self._lost_version += 1
        self._present[key] = present

    def _lost_nodes(self, key: int) -> list[dict[str, Any]]:
        """The nodes the live cluster ``key`` lost lately, as its card shows them."""
        with self._lock:
            lost = list(self._lost.get(key, {}).values())
        return [_as_lost(node) for node, _ in lost]

    def _on_close(self, cluster: Any) -> None:
        """A cluster of the process closed (in the closing thread): keep its final
        snapshot now, while its nodes are still listed."""
        if getattr(cluster, "name", "") in INTERNAL:
            return
        key = id(cluster)
        with self._lock:
            if cluster in self._ended:
                return
            monitor = self._monitors.pop(key, None)
            if monitor is not None and monitor.cluster is not cluster:
                self._monitors[key] = monitor  # another cluster at a reused id
                monitor = None
            self._end(key, cluster, monitor)

    def _end(self, key: int, cluster: Any, monitor: ClusterMonitor | None) -> None:
        """Keep the final snapshot of a cluster that closed (under the lock)."""
        self._ended.add(cluster)
        last = self._nodes.pop(key, [])
        self._present.pop(key, None)
        lost = self._lost.pop(key, {})
        if monitor is None:  # never followed: its counts are the cluster's own
            monitor = ClusterMonitor(cluster, history=0)
        try:
            final = _brief(monitor.snapshot(max_jobs=0), cluster, monitor.stopped)
        finally:
            monitor.close()
        if not final["counts"]["total"]:
            return  # nothing ran: nothing to show
        if not final["nodes"]:
            final["nodes"] = [node for node in last if node["id"] not in lost]
        present = {node["id"] for node in final["nodes"]}
        final["nodes"] = [
            {**node, "busy": 0, "released": True} for node in final["nodes"]
        ] + [_as_lost(node) for node, _ in lost.values() if node["id"] not in present]
        self._closed.appendleft(final)
        self._closed_version += 1

    def snapshots(self) -> list[dict[str, Any]]:
        """Live clusters (oldest first), then the recently closed (newest first)."""
        with self._lock:
            monitors = list(self._monitors.items())
            closed = list(self._closed)
        live = []
        for key, monitor in monitors:
            snap = _brief(
                monitor.snapshot(max_jobs=0), monitor.cluster, monitor.stopped
            )
            live.append(snap)
            lost = self._lost_nodes(key)
            if snap["nodes"]:
                # The nodes a panel was shown are the ones a closed card keeps,
                # even if the cluster got and released them between two refreshes.
                with self._lock:
                    if self._monitors.get(key) is monitor:
                        self._nodes[key] = snap["nodes"]
            present = {node["id"] for node in snap["nodes"]}
            # (A new list: the one kept in _nodes holds the nodes the cluster has.)
            snap["nodes"] = snap["nodes"] + [
                node for node in lost if node["id"] not in present
            ]
        # Placed in the order they came: the closed (oldest first), then the live.
        self._place([*reversed(closed), *live])
        return self._labelled(live + closed)

    def _place(self, cards: list[dict[str, Any]]) -> None:
        """Number each card not yet seen among the cards of its name, for good."""
        with self._lock:
            for card in cards:
                key = (card["id"], card["name"])
                if key not in self._places:
                    name = card["name"]
                    self._places[key] = self._named[name] = self._named.get(name, 0) + 1

    def _labelled(self, cards: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``cards`` under the names they are shown with: each the name the notebook
        gave it (``--into preds``, ``name=``, else its function's), as typed; while
        cards of one name are shown together, the newest (the one a re-run cell's
        ``preds`` holds) keeps it and each earlier one has its place after it,
        ``"preds (1)"``, told apart without renaming the run the notebook names."""
        with self._lock:
            places = [self._places[(card["id"], card["name"])] for card in cards]
        newest: dict[str, int] = {}
        for card, place in zip(cards, places, strict=True):
            newest[card["name"]] = max(newest.get(card["name"], 0), place)
        shared = Counter(card["name"] for card in cards)
        return [
            {**card, "name": f"{card['name']} ({place})"}
            if shared[card["name"]] > 1 and place != newest[card["name"]]
            else card
            for card, place in zip(cards, places, strict=True)
        ]

    def pulses(self) -> list[float | None]:
        """The ``pulse_interval`` each followed cluster asked of its nodes."""
        with self._lock:
            clusters = [monitor.cluster for monitor in self._monitors.values()]
        return [getattr(cluster, "pulse_interval", None) for cluster in clusters]

    def cancel(self, cluster_id: str) -> int:
        """Cancel every unfinished job of the cluster; return how many."""
        with self._lock:
            monitors = list(self._monitors.values())
        for monitor in monitors:
            if monitor.cluster.uid == cluster_id:
                run = run_of(monitor.cluster)
                if run is not None:  # its running jobs are cancelled, not failed
                    run.cancelling()
                return monitor.cancel_all()
        raise ConfigurationError(
            f"no live cluster {quoted(cluster_id)} in this kernel (it has closed); "
            "nothing to cancel"
        )

    def close(self) -> None:
        """Detach every monitor and stop observing closes."""
        if self._every_cluster:
            _live.remove_close_observer(self._on_close)
        with self._lock:
            monitors = list(self._monitors.values())
            self._monitors.clear()
        for monitor in monitors:
            monitor.close()


#: What the panel reads of a cluster's snapshot, of a node's record and of its load
#: figures (``ICluster``, ``INode``, ``INodeAvail`` in labextension/src/protocol.ts):
#: all it is sent, for a page closed without closing its comm has each push kept.
CLUSTER_FIELDS = ("id", "name", "closed", "starting", "counts", "nodes")
NODE_FIELDS = ("id", "name", "cpus", "busy", "jobs_done", "avail")
AVAIL_FIELDS = ("cpu", "memory")


def _brief(snapshot: dict[str, Any], cluster: Any, stopped: int = 0) -> dict[str, Any]:
    """A cluster's snapshot as the panel reads it: counts and nodes, no job list;
    named as the notebook names its run (``%%dispy --into NAME``), not after the
    function, which two cells may share, and a run's jobs counted as its cell counts
    them (`run_of`)."""
    brief = {key: snapshot[key] for key in CLUSTER_FIELDS if key != "starting"}
    # Its constructor still runs (connecting, the nodes running setup): its card
    # says so, under its run's name, not "no nodes connected yet" under the
    # function's for as long as a setup loads a model.
    brief["starting"] = starting = _starting(cluster)
    run = run_of(cluster) or (starting_run(cluster) if starting else None)
    if run is not None:
        brief["name"] = run.name
        # The jobs the run cancelled while they ran end Terminated: the cell counts
        # them cancelled, not failed, and so does the panel.
        stopped = run.stopped()
    # A cluster of no run: those cancelled while they ran (the panel's Cancel),
    # as its monitor saw them end (``stopped``), are cancelled too, not failed.
    if stopped:
        counts = brief["counts"] = dict(brief["counts"])
        stopped = min(stopped, counts["terminated"])
        counts["terminated"] -= stopped
        counts["cancelled"] += stopped
    brief["nodes"] = [_brief_node(node) for node in snapshot["nodes"]]
    return brief


def _starting(cluster: Any) -> bool:
    """Whether ``cluster``'s constructor still runs: it has no engine backend yet
    (it gets one once its nodes are connected and set up)."""
    return not cluster._closed and getattr(cluster, "_backend", True) is None


def _as_lost(node: dict[str, Any]) -> dict[str, Any]:
    """A node a cluster lost, as its card shows it: its last figures (released),
    marked ``lost`` (the panel says so in words, not as a released node)."""
    return {**node, "busy": 0, "released": True, "lost": True}


def _brief_node(record: dict[str, Any]) -> dict[str, Any]:
    """A node's record (`dispynb.monitoring`) as the panel reads it."""
    brief = {key: record[key] for key in NODE_FIELDS}
    avail = record["avail"]
    if avail is not None:
        brief["avail"] = {key: avail[key] for key in AVAIL_FIELDS}
    return brief


def quoted(value: Any) -> str:
    """``repr(value)`` cut to `SHOWN` characters, to quote a panel's value back."""
    return cut(repr(value))


def cut(text: str) -> str:
    """``text`` cut to `SHOWN` characters."""
    return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"


__all__ = [
    "AVAIL_FIELDS",
    "CLUSTER_FIELDS",
    "INTERNAL",
    "NODE_FIELDS",
    "RECENT_CLOSED",
    "ClusterTracker",
    "cut",
    "quoted",
]
