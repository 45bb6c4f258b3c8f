"""The kernel side of the JupyterLab panel (``labextension/``): a comm target.

The panel runs ``register()`` silently in the notebook's kernel, then opens a comm
to `TARGET`. For each open comm a `LabLink` pushes the kernel's state when what
the panel shows of it changes, from a background thread (ipykernel's IOPub socket
is thread-safe): the clusters of this process (`live_clusters`, each as a
`ClusterMonitor` snapshot without its job list, plus the last few that closed), the
nodes found by the panel's Discover action, and the nodes ``%dispy`` uses. It
answers the panel's requests: ``cancel`` (every unfinished job of a cluster),
``discover`` (UDP discovery, of given addresses or by broadcast) and ``nodes``.
What it shows of the clusters is `dispynb.jupyter.labclusters`' `ClusterTracker`;
the Discover action is `dispynb.jupyter.labdiscover`.

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

import contextvars
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from dispynb._interruptible import start_thread
from dispynb._version import __version__
from dispynb.errors import ConfigurationError
from dispynb.jupyter.labclusters import (
    AVAIL_FIELDS,
    CLUSTER_FIELDS,
    INTERNAL,
    NODE_FIELDS,
    RECENT_CLOSED,
    SHOWN,
    ClusterTracker,
    cut,
    quoted,
)
from dispynb.jupyter.labdiscover import (
    DISCOVERY_TIMEOUT,
    MAX_ADDRESSES,
    Discovered,
    discover,
)
from dispynb.jupyter.widgets import LOAD_INTERVAL, SendBudget

# (The names of `labclusters` and `labdiscover` were this module's: still here.)
__all__ = [
    "AVAIL_FIELDS",
    "CLUSTER_FIELDS",
    "DISCOVERY_TIMEOUT",
    "INTERNAL",
    "MAX_ADDRESSES",
    "NODE_FIELDS",
    "PROTOCOL",
    "RECENT_CLOSED",
    "SHOWN",
    "TARGET",
    "ClusterTracker",
    "Discovered",
    "LabLink",
    "discover",
    "register",
]

logger = logging.getLogger(__name__)

#: The comm target the panel opens.
TARGET = "dispynb.lab"
#: Bumped on incompatible message changes; the panel checks it.
PROTOCOL = 1
#: Seconds between two looks at the state (a change is pushed this soon).
PUSH_INTERVAL = 0.25
#: Seconds between two pushes at least (while the state keeps changing).
PUSH_SPACING = 1.0
#: Open panels followed at most: a reloaded page never closes its old comm, so the
#: oldest links stop pushing when more open.
MAX_LINKS = 8
#: Discover requests running at once (each holds a thread and a socket for
#: `DISCOVERY_TIMEOUT`); more are answered with an error.
MAX_DISCOVERIES = 2
#: ``send(data)``: what a link needs of a comm (``comm.send``).
Send = Callable[[dict[str, Any]], None]


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
                    f"not a request: {quoted(data)}; send "
                    '{"type": "request", "id": ..., "action": ...}'
                )
            self._serve(request_id, action, data)
        except ConfigurationError as exc:
            self._reply(request_id, error=str(exc))
        except Exception as exc:  # a bug: say so to the panel, keep serving
            logger.exception("dispynb panel: request %s failed", quoted(action))
            self._reply(
                request_id,
                error=f"{quoted(action)} failed in the kernel: "
                f"{type(exc).__name__}: {cut(str(exc))}",
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
                f"unknown request {quoted(action)}: this kernel's dispynb "
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
                # Said once: the panel reads "Discover failed: " before it.
                self._reply(request_id, error=str(exc) or type(exc).__name__)
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
