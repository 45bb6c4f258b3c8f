"""The kernel side of the JupyterLab panel (``labextension/``): a comm target.

The panel runs ``register()`` silently in the notebook's kernel, then opens a comm
to `TARGET`. For each open comm a `LabLink` pushes the kernel's state when what
the panel shows of it changes, from a background thread (ipykernel's IOPub socket
is thread-safe): the clusters of this process (`live_clusters`, each as a
`ClusterMonitor` snapshot without its job list, plus the last few that closed), the
nodes found by the panel's Discover action, and the nodes ``%dispy`` uses. It
answers the panel's requests: ``cancel`` (every unfinished job of a cluster),
``discover`` (UDP discovery, of given addresses or by broadcast) and ``nodes``.

A page closed without closing its comm leaves the link pushing, and the Jupyter
server keeps what a kernel sends for a closed tab until it is opened again: so a
change is pushed within `PUSH_INTERVAL` seconds, then at most every
`PUSH_SPACING` seconds (longer for a large state: `SendBudget`), and new load
figures alone at most every `LOAD_INTERVAL` seconds (nodes report them every
second); an unchanged state is never pushed again.

Messages (JSON; see ``labextension/src/protocol.ts``)::

    kernel -> panel  {"type": "state", "protocol": 1, "clusters": [...], ...}
                     {"type": "reply", "id": 3, "ok": true, "result": ...}
    panel -> kernel  {"type": "request", "id": 3, "action": "cancel", "cluster": "..."}
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from dispynb import _live
from dispynb._interruptible import start_thread
from dispynb._loop import LoopRunner
from dispynb._version import __version__
from dispynb.errors import ConfigurationError
from dispynb.jupyter.runstop import run_of, starting_run
from dispynb.jupyter.widgets import GONE_SHOWN, LOAD_INTERVAL, SendBudget
from dispynb.monitoring import ClusterMonitor, live_clusters

__all__ = ["PROTOCOL", "TARGET", "ClusterTracker", "LabLink", "discover", "register"]

logger = logging.getLogger(__name__)

#: The comm target the panel opens.
TARGET = "dispynb.lab"
#: Bumped on incompatible message changes; the panel checks it.
PROTOCOL = 1
#: Seconds between two looks at the state (a change is pushed this soon).
PUSH_INTERVAL = 0.25
#: Seconds between two pushes at least (while the state keeps changing).
PUSH_SPACING = 1.0
#: Closed clusters still shown (their final snapshot), most recent first.
RECENT_CLOSED = 5
#: Seconds the Discover action listens for answers.
DISCOVERY_TIMEOUT = 2.0
#: Addresses one Discover request may ping.
MAX_ADDRESSES = 256
#: Names of the clusters dispynb makes for itself (``%dispy`` checking that the
#: nodes answer): never shown.
INTERNAL = frozenset({"_dispynb_node_probe"})
#: Open panels followed at most: a reloaded page never closes its old comm, so the
#: oldest links stop pushing when more open.
MAX_LINKS = 8
#: Discover requests running at once (each holds a thread and a socket for
#: `DISCOVERY_TIMEOUT`); more are answered with an error.
MAX_DISCOVERIES = 2
#: Characters of a panel's value quoted back in an error.
SHOWN = 80

#: ``send(data)``: what a link needs of a comm (``comm.send``).
Send = Callable[[dict[str, Any]], None]


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
            f"no live cluster {_quoted(cluster_id)} in this kernel (it has closed); "
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


class Discovered:
    """Nodes found by the panel's Discover action (``ip:port`` -> node), shared."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, dict[str, Any]] = {}
        self.running = 0
        self.version = 0
        #: A discovery has answered (the panel then says no node answered, not
        #: "press Discover", of an empty list).
        self.searched = False

    def add(self, nodes: list[dict[str, Any]]) -> None:
        """Keep the nodes a discovery found (none, maybe)."""
        with self._lock:
            self.searched = True
            for node in nodes:
                self._nodes[f"{node['ip_addr']}:{node['port']}"] = node
            self.version += 1

    def nodes(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._nodes.values())

    def busy(self, delta: int) -> None:
        with self._lock:
            self.running += delta
            self.version += 1

    def begin(self, limit: int) -> bool:
        """Count one more discovery running, unless ``limit`` already run."""
        with self._lock:
            if self.running >= limit:
                return False
            self.running += 1
            self.version += 1
            return True


def discover(
    addresses: list[str], timeout: float = DISCOVERY_TIMEOUT
) -> list[dict[str, Any]]:
    """Ping for node servers (those on a network address answer by default; one on
    loopback only with ``--discovery`` if it has a secret); block ``timeout`` s
    (the pings run on dispynb's I/O loop; any thread may call this).

    ``addresses``: IPv4 addresses of nodes or broadcast addresses, each optionally
    with the nodes' UDP discovery port (``'10.0.0.5'``, ``'10.0.0.255:9700'``); empty:
    broadcast on every local network. Returns ``{"ip_addr", "port" (TCP), "name",
    "cpus"}`` for each node that answered. Raises `ConfigurationError` for a bad
    address.
    """
    from dispynb.transport.discovery import BROADCAST, Discovery

    if len(addresses) > MAX_ADDRESSES:
        raise ConfigurationError(
            f"{len(addresses)} addresses to discover: give at most {MAX_ADDRESSES} "
            "(or a broadcast address such as 10.0.0.255)"
        )
    discovery = Discovery(listen=False)  # replies to our pings only
    found: list[dict[str, Any]] = []

    def on_found(ip: str, port: int, name: str, cpus: int) -> None:
        found.append({"ip_addr": ip, "port": port, "name": name, "cpus": cpus})

    async def run() -> None:
        # start() parses every target first: a bad address fails before any ping.
        await discovery.start(addresses or [BROADCAST], on_found)
        try:
            await asyncio.sleep(timeout)
        finally:
            discovery.close()

    # On the process's one I/O loop (`dispynb._loop`), as clusters do: no loop of
    # its own in this thread, and it works under a running loop (a notebook cell).
    runner = LoopRunner.acquire()
    try:
        runner.run_sync(run)
    finally:
        runner.release()
    return found


class LabLink:
    """One panel's comm: pushes state, answers requests, until closed.

    ``send`` is the comm's ``send``; feed the panel's messages to `on_message`.
    ``tracker``, ``discovered`` and ``discoverer`` are shared (or faked in tests);
    ``session`` returns what ``%dispy`` uses.
    """

    def __init__(
        self,
        send: Send,
        *,
        tracker: ClusterTracker,
        discovered: Discovered,
        discoverer: Callable[[list[str]], list[dict[str, Any]]] = discover,
        session: Callable[[], dict[str, Any]] | None = None,
        interval: float = PUSH_INTERVAL,
        spacing: float = PUSH_SPACING,
    ) -> None:
        self._send = send
        self._tracker = tracker
        self._discovered = discovered
        self._discoverer = discoverer
        self._session = session or _magics_session
        self._interval = interval
        self._spacing = spacing
        self._wake = threading.Event()
        self._closed = threading.Event()
        # ipykernel sends a comm's messages with the parent request of the calling
        # context, and routes the panel's next messages to that request's subshell:
        # push from the comm handler's context (its subshell), not from the running
        # cell's (the main shell, busy while a cell waits for jobs).
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run,
            args=(self._push_loop,),
            name="dispynb-lab-push",
            daemon=True,
        )
        start_thread(self._thread)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self, wait: bool = True) -> None:
        """Stop pushing (the comm closed); idempotent."""
        self._closed.set()
        self._wake.set()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(5)

    def push_now(self) -> None:
        """Push the state at the next poll even if it did not change."""
        self._wake.set()

    def state(self) -> dict[str, Any]:
        """The whole state message."""
        return {
            "type": "state",
            "protocol": PROTOCOL,
            "version": __version__,
            "clusters": self._tracker.snapshots(),
            "discovered": self._discovered.nodes(),
            "discovering": self._discovered.running > 0,
            "searched": self._discovered.searched,
            "session": self._session(),
        }

    # -- pushing (own thread) ----------------------------------------------------------

    def _push_loop(self) -> None:
        last: Any = None  # the versions last looked at
        sent: tuple[str, str] | None = None  # what the panel was last sent
        due = float("inf")  # when a change not pushed yet may go
        allowed = float("-inf")  # no push before (spacing)
        budget = SendBudget()
        load_sent = float("-inf")  # when new load figures last went
        failing = False
        while not self._closed.is_set():
            try:
                session = self._session()
                key = (self._tracker.refresh(), self._discovered.version, session)
                forced = self._wake.is_set()
                now = time.monotonic()
                if key != last or forced or now >= due:
                    self._wake.clear()
                    last, due = key, float("inf")
                    state = self.state()
                    shown = _shown(state)
                    allowed = max(allowed, now + budget.wait(now))
                    if forced or sent is None or shown[0] != sent[0]:
                        due = allowed  # a change: as soon as the spacing allows
                    elif shown[1] != sent[1]:  # only load figures
                        due = max(allowed, load_sent + self._load_interval())
                    if forced or now >= due:
                        self._safe_send(state)
                        if sent is None or shown[1] != sent[1]:
                            load_sent = now
                        sent, due = shown, float("inf")
                        budget.spend(len(shown[0]) + len(shown[1]), now)
                        allowed = now + self._spacing
                failing = False
            except Exception:
                if not failing:  # once per failure streak, not 4 times a second
                    logger.exception("dispynb panel: cannot build the state")
                failing = True
            # Polling the versions is cheap; this also throttles the pushes.
            self._closed.wait(self._interval)

    def _load_interval(self) -> float:
        """Seconds between pushes of new load figures alone: `LOAD_INTERVAL`, or
        the shortest ``pulse_interval`` a followed cluster asked its nodes for."""
        return min(
            [LOAD_INTERVAL, *(p for p in self._tracker.pulses() if p)],
        )

    def _safe_send(self, data: dict[str, Any]) -> None:
        if self._closed.is_set():
            return
        try:
            self._send(data)
        except Exception as exc:  # the kernel is shutting down, or the comm is gone
            logger.debug("dispynb panel: send failed (%s); stopping", exc)
            self._closed.set()

    # -- requests (comm handler thread) -----------------------------------------------

    def on_message(self, data: Any) -> None:
        """Handle one message from the panel (the comm message's ``data``).

        Every message gets a reply, an error if it cannot be served (one that is
        no request too, with its ``id`` if it has one): the panel waits for it.
        """
        request_id = data.get("id") if isinstance(data, dict) else None
        action = data.get("action") if isinstance(data, dict) else None
        try:
            if not isinstance(data, dict) or data.get("type") != "request":
                raise ConfigurationError(
                    f"not a request: {_quoted(data)}; send "
                    '{"type": "request", "id": ..., "action": ...}'
                )
            self._serve(request_id, action, data)
        except ConfigurationError as exc:
            self._reply(request_id, error=str(exc))
        except Exception as exc:  # a bug: say so to the panel, keep serving
            logger.exception("dispynb panel: request %s failed", _quoted(action))
            self._reply(
                request_id,
                error=f"{_quoted(action)} failed in the kernel: "
                f"{type(exc).__name__}: {_cut(str(exc))}",
            )

    def _serve(self, request_id: Any, action: Any, data: dict[str, Any]) -> None:
        if action == "cancel":
            cluster = data.get("cluster")
            if not isinstance(cluster, str):
                raise ConfigurationError("cancel needs the cluster's id")
            self._reply(request_id, self._tracker.cancel(cluster))
            self.push_now()
        elif action == "discover":
            addresses = data.get("addresses") or []
            if not isinstance(addresses, list) or not all(
                isinstance(a, str) for a in addresses
            ):
                raise ConfigurationError("discover needs a list of addresses")
            self._start_discovery(request_id, addresses)
        elif action == "nodes":
            state = self.state()
            self._reply(
                request_id,
                {key: state[key] for key in ("clusters", "discovered", "session")},
            )
        else:
            raise ConfigurationError(
                f"unknown request {_quoted(action)}: this kernel's dispynb "
                f"{__version__} knows cancel, discover and nodes"
            )

    def _start_discovery(self, request_id: Any, addresses: list[str]) -> None:
        # Discovery blocks for seconds: never on the comm handler's thread, and
        # a few at once at most (each holds a thread and a socket).
        if not self._discovered.begin(MAX_DISCOVERIES):
            raise ConfigurationError(
                f"{MAX_DISCOVERIES} discoveries are running already: "
                "ask again when one has answered"
            )
        self.push_now()  # the panel shows it is discovering: at once

        def run() -> None:
            try:
                found = self._discoverer(addresses)
            except Exception as exc:
                self._reply(request_id, error=f"discovery failed: {exc}")
            else:
                self._discovered.add(found)
                self._reply(request_id, found)
            finally:
                self._discovered.busy(-1)
                self.push_now()

        context = contextvars.copy_context()  # see __init__
        thread = threading.Thread(
            target=context.run, args=(run,), name="dispynb-lab-discover", daemon=True
        )
        try:
            start_thread(thread)
        except BaseException:
            self._discovered.busy(-1)
            raise

    def _reply(self, request_id: Any, result: Any = None, error: str = "") -> None:
        message: dict[str, Any] = {"type": "reply", "id": request_id, "ok": not error}
        if error:
            message["error"] = error
        else:
            message["result"] = result
        self._safe_send(message)


def _shown(state: dict[str, Any]) -> tuple[str, str]:
    """What the panel shows of ``state`` (as JSON): all but the nodes' load figures
    (which change at every report), and the load figures."""
    rest, load = [], []
    for cluster in state["clusters"]:
        brief = dict(cluster)
        brief["nodes"] = [
            {k: v for k, v in node.items() if k != "avail"} for node in cluster["nodes"]
        ]
        rest.append(brief)
        load.append([node["avail"] for node in cluster["nodes"]])
    others = {k: v for k, v in state.items() if k != "clusters"}
    return (
        json.dumps([others, rest], sort_keys=True, default=str),
        json.dumps(load, default=str),
    )


def _quoted(value: Any) -> str:
    """``repr(value)`` cut to `SHOWN` characters, to quote a panel's value back."""
    return _cut(repr(value))


def _cut(text: str) -> str:
    return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"


def _magics_session() -> dict[str, Any]:
    """What ``%dispy`` uses here: ``{"kind": "local" | "nodes" | "", "nodes"}``."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        magics = shell.magics_manager.registry.get("DispyMagics") if shell else None
        session = getattr(magics, "session", None)
        if session is None or session.nodes is None:
            return {"kind": "", "nodes": []}
        return dict(session.header())
    except Exception as exc:  # a half-closed session: show nothing rather than fail
        logger.debug("dispynb panel: no %%dispy session (%s)", exc)
        return {"kind": "", "nodes": []}


# -- the comm target -------------------------------------------------------------------

_tracker: ClusterTracker | None = None
_discovered = Discovered()
_links: list[LabLink] = []
_lock = threading.Lock()


def register() -> None:
    """Register the ``dispynb.lab`` comm target in this kernel; idempotent.

    The panel runs this silently (no output, no history) before opening its comm.
    """
    import comm

    comm.get_comm_manager().register_target(TARGET, _open)


def _open(comm: Any, open_msg: dict[str, Any]) -> None:
    """A panel opened a comm: start a `LabLink` on it."""
    global _tracker
    with _lock:
        if _tracker is None:
            _tracker = ClusterTracker()
        tracker = _tracker
    link = LabLink(comm.send, tracker=tracker, discovered=_discovered)
    with _lock:
        _links.append(link)
        stale = _links[:-MAX_LINKS]
        del _links[:-MAX_LINKS]
    for old in stale:
        old.close(wait=False)

    def on_msg(msg: dict[str, Any]) -> None:
        link.on_message(msg.get("content", {}).get("data"))

    def on_close(msg: dict[str, Any]) -> None:
        global _tracker
        link.close(wait=False)
        with _lock:
            if link in _links:
                _links.remove(link)
            idle = None if _links else _tracker
            if idle is not None:
                _tracker = None  # nobody looks: stop following the clusters
        if idle is not None:
            idle.close()

    comm.on_msg(on_msg)
    comm.on_close(on_close)
