"""The open clusters of this process: listed for monitors, closed at interpreter exit.

`JobCluster` registers itself here when it is created and unregisters when it
closes; `live_clusters` lists the others (`dispynb.monitoring`, the lab panel). At
interpreter exit the clusters a program did not close are closed, as dispy does.

Monitors that poll `live_clusters` never see a cluster whose whole life falls
between two polls (a few quick jobs): `add_close_observer` calls them when a cluster
closes, in the closing thread, while its nodes are still listed.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dispynb.cluster import JobCluster

logger = logging.getLogger(__name__)

#: Seconds a cluster left open waits at interpreter exit for its cancelled jobs.
EXIT_WAIT = 10.0

_ids = itertools.count(1)
# By creation order; weak: a cluster garbage-collected unclosed just disappears.
_live: dict[int, weakref.ref[JobCluster]] = {}
_exit_hook = threading.Lock()
_exit_hooked = False
#: Called with each cluster that closes; replaced, never mutated (iterated unlocked).
_close_observers: tuple[Callable[[JobCluster], None], ...] = ()
_observers_lock = threading.Lock()


def register(cluster: JobCluster) -> int:
    """List ``cluster`` (and close it at exit if still open); its id."""
    global _exit_hooked
    cluster_id = next(_ids)
    _live[cluster_id] = weakref.ref(cluster)
    with _exit_hook:
        # Last registered, first run: moved behind the exit hooks registered
        # since (a LocalCluster started for this cluster closes its nodes at
        # exit), the clusters close before their nodes go (no "node left").
        if _exit_hooked:
            atexit.unregister(_close_at_exit)
        atexit.register(_close_at_exit)
        _exit_hooked = True
    return cluster_id


def unregister(cluster_id: int, cluster: JobCluster | None = None) -> None:
    """The cluster closed: unlist it and tell the close observers (``cluster``)."""
    _live.pop(cluster_id, None)
    if cluster is None:
        return
    for observer in _close_observers:
        try:
            observer(cluster)
        except Exception:  # a monitor's failure must never fail a close
            logger.exception("a close observer failed for cluster %r", cluster.name)


def add_close_observer(observer: Callable[[JobCluster], None]) -> None:
    """Call ``observer(cluster)`` whenever a cluster closes (in the closing thread,
    which it must not block; exceptions are logged, never raised to the closer)."""
    global _close_observers
    with _observers_lock:
        _close_observers = (*_close_observers, observer)


def remove_close_observer(observer: Callable[[JobCluster], None]) -> None:
    """Stop calling ``observer`` (compared with ==: a bound method matches);
    no error if it was not added."""
    global _close_observers
    with _observers_lock:
        _close_observers = tuple(o for o in _close_observers if o != observer)


def live_clusters() -> list[JobCluster]:
    """The clusters of this process that are not closed, oldest first."""
    clusters = [ref() for _, ref in sorted(_live.items())]
    return [c for c in clusters if c is not None and not c._closed]


def _close_at_exit() -> None:
    # Jobs still pending have nobody left to read them: terminate them (dispy waited
    # for them), release the nodes and remove the default recovery file. Bounded:
    # an exit never hangs on a node that does not answer.
    for cluster in reversed(live_clusters()):
        try:
            cluster.close(timeout=EXIT_WAIT, terminate=True)
        except Exception:
            logger.warning("closing cluster %r at exit failed", cluster.name)


__all__ = [
    "EXIT_WAIT",
    "add_close_observer",
    "live_clusters",
    "register",
    "remove_close_observer",
    "unregister",
]
