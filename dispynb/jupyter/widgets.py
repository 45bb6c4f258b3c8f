"""The node panel: the nodes runs have used, live from ``cluster_status`` events.

`NodeTable` is the model (pure, thread-safe): it folds ``cluster_status(status, node,
job)`` events from any number of clusters into one row per node address. `NodePanel`
shows it as an HTML table redrawn in place (``update_display_data``, throttled) as
events arrive: what the notebook saves is the table as it last stood, readable
once the notebook is opened again, in nbviewer or on GitHub (a widget's model is
not saved with a notebook: it read "Error displaying widget: model not found").

Feed a panel from your own cluster by chaining its callback::

    panel = NodePanel()
    cluster = JobCluster(compute, nodes=..., cluster_status=panel.cluster_status)
    panel  # in a cell: the live table
"""

from __future__ import annotations

import dataclasses
import html
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from dispynb._interruptible import start_thread
from dispynb.job import DispyJob, JobStatus
from dispynb.jupyter import display as templates
from dispynb.node import DispyNode, NodeStatus

__all__ = [
    "BYTE_BURST",
    "BYTE_RATE",
    "GONE_SHOWN",
    "LOAD_INTERVAL",
    "NodePanel",
    "NodeRow",
    "NodeTable",
]

#: Seconds a node that left (or was replaced) stays in the table, greyed as gone.
GONE_SHOWN = 30.0
#: Seconds between two redraws of a live display (the node panel, the lab panel)
#: that only bring new load figures (nodes report them every second), unless the
#: nodes were asked to report less often (``pulse_interval``, ``%dispy --pulse``).
LOAD_INTERVAL = 10.0
#: Bytes a second a live table of nodes sends at most on average (its redraws
#: are spaced by their size): a few MB an hour however many nodes it shows...
BYTE_RATE = 1000.0
#: ... after a first burst of this many bytes.
BYTE_BURST = 20_000.0


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


class SendBudget:
    """The bytes a live display may send: `BYTE_RATE` a second on average, after
    a burst of `BYTE_BURST` (a token bucket). Not thread-safe: its display's lock
    guards it."""

    def __init__(self, rate: float = BYTE_RATE, burst: float = BYTE_BURST) -> None:
        self.rate = rate
        self.burst = burst
        self._left = burst
        self._at = time.monotonic()

    def wait(self, now: float) -> float:
        """Seconds until the display may send again (0.0: now)."""
        self._refill(now)
        return 0.0 if self._left >= 0 else -self._left / self.rate

    def spend(self, size: int, now: float) -> None:
        """``size`` bytes were sent at ``now``."""
        self._refill(now)
        self._left -= size

    def _refill(self, now: float) -> None:
        self._left = min(self.burst, self._left + (now - self._at) * self.rate)
        self._at = max(self._at, now)


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
        #: Rows dropped after `GONE_SHOWN` (`mark_gone` adds none of them again).
        self._dropped: set[str] = set()

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
            self._dropped.discard(address)
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

    def mark_gone(
        self, addresses: list[str], names: dict[str, str] | None = None
    ) -> None:
        """These nodes left (e.g. their process exited). One never seen (it exited
        before anything reached it) gets a row, gone, named from ``names``, once:
        shown as long as one seen is."""
        with self._lock:
            now = time.time()
            for address in addresses:
                if address not in self._info:
                    if address in self._dropped:
                        continue
                    self._order.append(address)
                    self._info[address] = ((names or {}).get(address, ""), 0)
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
        self._dropped.add(address)
        for table in (self._info, self._live, self._closed_done, self._load):
            table.pop(address, None)


class NodePanel:
    """A live table of nodes (name, address, CPUs, busy, jobs ended, CPU used, memory
    free, state).

    Pass `cluster_status` (or `chain`) as a cluster's ``cluster_status`` callback.
    Shown in a kernel (``display(panel)``, or ``panel`` last in a cell), it is an
    HTML table with a ``display_id``, redrawn in place as the table changes and
    saved with the notebook as it last stood, stamped with the time it was drawn
    (a widget would read "Error displaying widget" once the notebook is opened
    again). ``panel.widget``, an ``ipywidgets.HTML`` redrawn the same way, is there
    to place the table in a layout of your own widgets (as every widget, it is not
    saved with the notebook). Elsewhere only the model (``panel.rows()``) and the
    static ``_repr_html_`` are kept up to date.

    What it sends stays small, for a Jupyter server keeps a kernel's messages for a
    notebook whose tab is closed: a panel never shown sends nothing, a redraw comes
    only when what it shows changed, at most every ``interval`` seconds and
    `BYTE_RATE` bytes a second (`SendBudget`), and new load figures alone (nodes
    report theirs every second) at most every ``load_interval`` seconds.
    """

    def __init__(
        self,
        interval: float = 1.0,
        widget: bool | None = None,
        load_interval: float = LOAD_INTERVAL,
    ) -> None:
        self.table = NodeTable()
        self.interval = interval
        self.load_interval = load_interval
        self._wanted = widget is None or widget
        if widget:
            import ipywidgets  # noqa: F401 (asked for: fail now without it)
        self._widget: Any = None
        self._display_id: str | None = None  # once shown in a kernel
        self._lock = threading.RLock()
        self._next = float("-inf")  # no redraw before (time.monotonic())
        self._budget = SendBudget()
        self._load_shown = float("-inf")  # when load figures last changed on it
        self._shown: tuple[Any, Any] | None = None  # what it shows: (rest, load)
        self._timer: threading.Timer | None = None
        #: Set by `stopped`: the rows drawn as they last stood, and why they stay.
        self._kept: tuple[list[NodeRow], str] | None = None

    @property
    def widget(self) -> Any:
        """The table as an ``ipywidgets.HTML``, made when first asked for (to
        place it in a layout of widgets; ``display(panel)`` needs none); None
        without ipywidgets or with ``widget=False``."""
        with self._lock:
            if self._widget is None and self._wanted:
                try:
                    import ipywidgets
                except ImportError:
                    self._wanted = False
                    return None
                self._widget = ipywidgets.HTML()
                self._draw(force=True)
            return self._widget

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
        with self._lock:
            if addresses != []:
                self._kept = None  # nodes again: the panel follows them
        self.redraw()

    def stopped(self, why: str) -> None:
        """Every node shown was stopped on purpose (``why``: ``"%dispy close
        stopped them"``): the panel keeps its rows as they last stood, stamped
        with the time and ``why``, rather than greying each as gone (what a
        saved notebook showed above its runs); it follows nodes again when
        some are in use (`in_use`)."""
        rows = self.rows()
        self.table.in_use([])
        with self._lock:
            at = time.strftime("%H:%M:%S")
            self._kept = (rows, f"nodes as of {at}, when {why}")
            self._draw(force=True)

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
        """Redraw the widget now (if it was made)."""
        with self._lock:
            self._draw(force=True)

    def _request_draw(self) -> None:
        with self._lock:
            if not self._drawn():
                return  # never shown: nothing to send
            now = time.monotonic()
            wait = max(self._next - now, self._budget.wait(now))
            if wait > 0:
                self._draw_in(wait)
            else:
                self._draw()

    def _draw(self, force: bool = False) -> None:
        """Redraw if the table shows something new (with the lock held); new load
        figures alone wait for ``load_interval`` seconds after the last ones."""
        self._cancel_timer()
        if not self._drawn():
            return
        rows = self.rows() if self._kept is None else self._kept[0]
        shown = _shown(rows)
        now = time.monotonic()
        last = self._shown
        if not force and last is not None and shown[0] == last[0]:
            if shown[1] == last[1]:
                return
            wait = self._load_shown + self.load_interval - now
            if wait > 0:
                self._draw_in(wait)
                return
        size = 0
        if self._widget is not None:
            value = templates.nodes_html(rows, live=True)
            self._widget.value = value
            size += len(value)
        if self._display_id is not None:
            from IPython.display import update_display

            bundle = self._bundle(rows, live=True)
            update_display(bundle, raw=True, display_id=self._display_id)
            size += sum(len(part) for part in bundle.values())
        if last is None or shown[1] != last[1]:
            self._load_shown = now
        self._shown = shown
        self._next = now + self.interval
        self._budget.spend(size, now)

    def _drawn(self) -> bool:
        """Whether the panel is shown anywhere (its widget made, or displayed)."""
        return self._widget is not None or self._display_id is not None

    def _draw_in(self, wait: float) -> None:
        if self._timer is None:
            self._timer = threading.Timer(wait, self._timed_draw)
            self._timer.daemon = True
            start_thread(self._timer)

    def _timed_draw(self) -> None:
        with self._lock:
            self._timer = None
            self._draw()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _ipython_display_(self) -> None:
        """Show the table in a kernel: a display redrawn in place as the table
        changes (each display of a panel shows the same table); elsewhere (a
        terminal) the table as it stands."""
        from IPython.display import display

        from dispynb.jupyter.progress import in_kernel

        if not in_kernel():
            display(self._bundle(self.rows()), raw=True)
            return
        with self._lock:
            if self._display_id is None:
                self._display_id = uuid.uuid4().hex
            rows = self.rows() if self._kept is None else self._kept[0]
            display(
                self._bundle(rows, live=True),
                raw=True,
                display_id=self._display_id,
            )

    def _bundle(self, rows: list[NodeRow], live: bool = False) -> dict[str, str]:
        """``rows`` as HTML (``live``: stamped with the time, its cells styled
        once) and as text."""
        table = templates.nodes_html(rows, live=live)
        text = _text(rows)
        if live:
            stamp = f"nodes as of {time.strftime('%H:%M:%S')}"
            if self._kept is not None:
                stamp = self._kept[1]
                text += f"\n{stamp}"
            table += (
                "<div class='dispynb-nodes-time' style='font-size:80%;"
                f"color:#757575'>{html.escape(stamp)}</div>"
            )
        return {"text/html": table, "text/plain": text}

    def _repr_html_(self) -> str:
        return templates.nodes_html(self.rows())

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        return self._bundle(self.rows())

    def __repr__(self) -> str:
        return _text(self.rows())


def _text(rows: list[NodeRow]) -> str:
    """The panel's text: a line per node."""
    lines = [f"<NodePanel {len(rows)} node{'' if len(rows) == 1 else 's'}>"]
    lines += [
        f"  {r.name or '?'} {r.address} cpus={r.cpus} busy={r.busy} "
        f"jobs_done={r.jobs_done} cpu_used={templates.format_load(r.cpu_free)} "
        f"memory_free={templates.format_bytes(r.memory_free)} "
        f"{r.state}"
        for r in rows
    ]
    return "\n".join(lines)


def _shown(rows: list[NodeRow]) -> tuple[Any, Any]:
    """What the table shows of ``rows``: everything but the load figures, and the
    load figures (as shown; whether a node has reported any is in the first)."""
    rest = tuple(
        (r.address, r.name, r.cpus, r.busy, r.jobs_done, r.state, r.cpu_free is None)
        for r in rows
    )
    load = tuple(
        (templates.format_load(r.cpu_free), templates.format_bytes(r.memory_free))
        for r in rows
    )
    return rest, load
