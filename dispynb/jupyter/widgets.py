"""The node panel: the nodes runs have used, live from ``cluster_status`` events.

`NodeTable` is the model (pure, thread-safe): it folds ``cluster_status(status, node,
job)`` events from any number of clusters into one row per node address. `NodePanel`
shows it as an ipywidgets ``HTML`` table redrawn (throttled) as events arrive; its
``_repr_html_`` is the static snapshot for front ends without widgets.

Feed a panel from your own cluster by chaining its callback::

    panel = NodePanel()
    cluster = JobCluster(compute, nodes=..., cluster_status=panel.cluster_status)
    panel  # in a cell: the live table
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

from dispynb._interruptible import start_thread
from dispynb.job import DispyJob, JobStatus
from dispynb.jupyter import display as templates
from dispynb.node import DispyNode, NodeStatus

__all__ = ["GONE_SHOWN", "NodePanel", "NodeRow", "NodeTable"]

#: Seconds a node that left (or was replaced) stays in the table, greyed as gone.
GONE_SHOWN = 30.0


@dataclasses.dataclass
class NodeRow:
    """One node as the panel shows it.

    ``busy`` and ``jobs_done`` add up over every cluster (run) that used the node;
    ``connected`` is whether a cluster is connected to it now. ``cpu_free`` (percent
    of CPU available) and ``memory_free`` (bytes) are the node's latest report
    (``DispyNode.avail_info``: at connection, then with each ``AvailInfo`` event,
    every ``pulse_interval``), None until one arrives; ``load_time`` is when it
    arrived (epoch seconds).
    """

    address: str
    name: str = ""
    cpus: int = 0
    busy: int = 0
    jobs_done: int = 0
    connected: bool = False
    update_time: float = 0.0
    cpu_free: float | None = None
    memory_free: int | None = None
    load_time: float | None = None
    gone: bool = False

    @property
    def state(self) -> str:
        """``"in use"``, ``"idle"`` or ``"gone"`` (left, replaced or exited)."""
        if self.gone:
            return "gone"
        return "in use" if self.connected else "idle"


class NodeTable:
    """Rows of nodes, keyed by ``"address:port"``, folded from cluster events.

    Each cluster's view of a node is a separate `DispyNode` object; rows add them up.
    Jobs done by clusters that have closed are remembered. A node that left (its
    cluster lost it), or that is no longer among the nodes in use (`in_use`), is
    shown as gone for `GONE_SHOWN` seconds, then dropped; its figures are frozen.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # address -> {id(cluster's DispyNode): that DispyNode}
        self._live: dict[str, dict[int, DispyNode]] = {}
        self._closed_done: dict[str, int] = {}
        self._info: dict[str, tuple[str, int]] = {}
        self._load: dict[str, tuple[float, int, float]] = {}  # cpu, memory, when
        self._order: list[str] = []
        self._gone: dict[str, float] = {}  # address -> when it went (time.time())
        self._in_use: set[str] | None = None  # None: every node seen is in use

    def event(
        self,
        status: int,
        node: DispyNode | None,
        job: DispyJob | None,
        *,
        lost: bool = False,
    ) -> bool:
        """Apply one ``cluster_status`` event; return whether the table changed.

        ``lost``: a ``Closed`` event of a node that left while its cluster was open
        (it died or shut down), not of a cluster that closed.
        """
        if node is None:
            return False
        address = f"{node.ip_addr}:{node.port}"
        with self._lock:
            if status == NodeStatus.Initialized:
                self._gone.pop(address, None)  # back (or a new node on that port)
            if lost:
                self._gone.setdefault(address, time.time())
            if address not in self._info:
                self._order.append(address)
            self._info[address] = (node.name, node.cpus)
            info = node.avail_info
            if info is not None:
                self._load[address] = (float(info.cpu), int(info.memory), time.time())
            elif status == NodeStatus.AvailInfo:  # the node cannot read them now
                self._load.pop(address, None)
            live = self._live.setdefault(address, {})
            if status == NodeStatus.Closed:
                gone = live.pop(id(node), None)
                if gone is not None:
                    self._closed_done[address] = (
                        self._closed_done.get(address, 0) + gone.jobs_done
                    )
            elif status in (NodeStatus.Initialized, NodeStatus.AvailInfo) or (
                isinstance(status, JobStatus)
            ):
                live[id(node)] = node
        return True

    def in_use(self, addresses: list[str] | None) -> None:
        """The nodes in use now (``"host:port"``; None: all); any other is gone."""
        with self._lock:
            now = time.time()
            self._in_use = None if addresses is None else set(addresses)
            for address in self._order:
                if self._in_use is not None and address not in self._in_use:
                    self._gone.setdefault(address, now)

    def mark_gone(self, addresses: list[str]) -> None:
        """These nodes left (e.g. their process exited)."""
        with self._lock:
            now = time.time()
            for address in addresses:
                if address in self._info:
                    self._gone.setdefault(address, now)

    def rows(self) -> list[NodeRow]:
        """A snapshot of every node seen, in the order they appeared, without those
        gone for more than `GONE_SHOWN` seconds."""
        with self._lock:
            now = time.time()
            expired = [a for a, t in self._gone.items() if now - t > GONE_SHOWN]
            for address in expired:
                del self._gone[address]
                self._forget(address)
            rows = []
            for address in self._order:
                name, cpus = self._info[address]
                gone = address in self._gone
                live = [] if gone else list(self._live.get(address, {}).values())
                cpu_free, memory_free, load_time = self._load.get(
                    address, (None, None, None)
                )
                rows.append(
                    NodeRow(
                        address=address,
                        name=name,
                        cpus=cpus,
                        busy=sum(max(n.busy, 0) for n in live),
                        jobs_done=self._closed_done.get(address, 0)
                        + sum(n.jobs_done for n in live),
                        connected=bool(live),
                        update_time=max((n.update_time for n in live), default=0.0),
                        cpu_free=cpu_free,
                        memory_free=memory_free,
                        load_time=load_time,
                        gone=gone,
                    )
                )
            return rows

    def _forget(self, address: str) -> None:
        """Drop a node's row (with the lock held)."""
        self._order.remove(address)
        for table in (self._info, self._live, self._closed_done, self._load):
            table.pop(address, None)


class NodePanel:
    """A live table of nodes (name, address, CPUs, busy, jobs done, CPU used, memory
    free, state).

    Pass `cluster_status` (or `chain`) as a cluster's ``cluster_status`` callback.
    Inside a kernel with ipywidgets, ``panel.widget`` is an ``ipywidgets.HTML`` whose
    ``value`` is redrawn at most every ``interval`` seconds; elsewhere only the model
    (``panel.rows()``) and the static ``_repr_html_`` are kept up to date.
    """

    def __init__(self, interval: float = 0.5, widget: bool | None = None) -> None:
        self.table = NodeTable()
        self.interval = interval
        self.widget: Any = None
        if widget is None or widget:
            try:
                import ipywidgets
            except ImportError:
                if widget:
                    raise
            else:
                self.widget = ipywidgets.HTML(value=templates.nodes_html([]))
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._timer: threading.Timer | None = None

    def rows(self) -> list[NodeRow]:
        return self.table.rows()

    def cluster_status(
        self,
        status: int,
        node: DispyNode | None,
        job: DispyJob | None,
        *,
        lost: bool = False,
    ) -> None:
        """A ``cluster_status`` callback: update the table, then redraw (throttled).

        ``lost``: see `NodeTable.event`.
        """
        if self.table.event(status, node, job, lost=lost):
            self._request_draw()

    def in_use(self, addresses: list[str] | None) -> None:
        """Only these nodes are in use now (see `NodeTable.in_use`); redraw."""
        self.table.in_use(addresses)
        self.redraw()

    def chain(
        self, callback: Callable[[int, DispyNode | None, DispyJob | None], Any] | None
    ) -> Callable[[int, DispyNode | None, DispyJob | None], None]:
        """A ``cluster_status`` callback that feeds this panel, then ``callback``."""

        def chained(status: int, node: DispyNode | None, job: DispyJob | None) -> None:
            self.cluster_status(status, node, job)
            if callback is not None:
                callback(status, node, job)

        return chained

    def redraw(self) -> None:
        """Redraw the widget now."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._last = time.monotonic()
            if self.widget is not None:
                self.widget.value = templates.nodes_html(self.rows())

    def _request_draw(self) -> None:
        with self._lock:
            wait = self._last + self.interval - time.monotonic()
            if wait > 0:
                if self._timer is None:
                    self._timer = threading.Timer(wait, self.redraw)
                    self._timer.daemon = True
                    start_thread(self._timer)
                return
        self.redraw()

    def _repr_html_(self) -> str:
        return templates.nodes_html(self.rows())

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle: dict[str, Any] = {}
        if self.widget is not None:
            bundle.update(self.widget._repr_mimebundle_(**kwargs) or {})
        bundle["text/html"] = self._repr_html_()
        bundle["text/plain"] = repr(self)
        return bundle

    def __repr__(self) -> str:
        rows = self.rows()
        lines = [f"<NodePanel {len(rows)} nodes>"]
        lines += [
            f"  {r.name or '?'} {r.address} cpus={r.cpus} busy={r.busy} "
            f"jobs_done={r.jobs_done} cpu_used={templates.format_load(r.cpu_free)} "
            f"memory_free={templates.format_bytes(r.memory_free)} "
            f"{r.state}"
            for r in rows
        ]
        return "\n".join(lines)
