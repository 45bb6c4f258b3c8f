"""The open clusters of this process: listed for monitors, closed at interpreter exit.

`JobCluster` registers itself here when it is created and unregisters when it
closes; `live_clusters` lists the others (`dispynb.monitoring`, the lab panel). At
interpreter exit the clusters a program did not close are closed, as dispy does: a
script's wait for their jobs first, as dispy's ``close()`` at exit does.

Monitors that poll `live_clusters` never see a cluster whose whole life falls
between two polls (a few quick jobs): `add_close_observer` calls them when a cluster
closes, in the closing thread, while its nodes are still listed.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dispynb.cluster import JobCluster

logger = logging.getLogger(__name__)

#: Seconds a cluster left open waits at interpreter exit for the jobs it cancelled
#: (interrupted, interactive or `JobCluster.terminate_at_exit`).
EXIT_WAIT = 10.0

_ids = itertools.count(1)
# By creation order; weak: a cluster garbage-collected unclosed just disappears.
_live: dict[int, weakref.ref[JobCluster]] = {}
_exit_hook = threading.Lock()
_exit_hooked = False
_terminating_at_exit = False  # set once the exit hooks close the clusters
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
            atexit.unregister(_close_left_at_exit)
        atexit.register(_close_left_at_exit)  # runs right after _close_at_exit
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
    # A script's clusters wait for their jobs, as dispy's do at exit: a program
    # whose callbacks take the results (and may submit more) ends once they are
    # done. Ctrl-C (the one that ended the script, or one during that wait), an
    # interactive session (a notebook kernel shutting down, a REPL: the user has
    # left) and a cluster that asked for it (`Executor`) terminate them instead,
    # within `EXIT_WAIT` (an exit never hangs on a node that does not answer).
    # Then the nodes are released and the default recovery file is removed.
    try:
        if isinstance(getattr(sys, "last_value", None), KeyboardInterrupt):
            # Python printed the traceback and set it: the user stopped the script.
            if any(c._outstanding for c in live_clusters()):
                logger.warning("interrupted: the jobs not done are terminated")
        elif not _interactive():
            for cluster in reversed(live_clusters()):
                if not cluster.terminate_at_exit:
                    # Again while callbacks (run by wait()) submitted more jobs.
                    while cluster.wait() and cluster._outstanding:
                        pass
    except KeyboardInterrupt:
        logger.warning("interrupted at exit: the jobs not done are terminated")
    _terminate_open()


def _close_left_at_exit() -> None:
    # A Ctrl-C that arrived as `_close_at_exit` began (between two exit hooks:
    # the user's last one returning) is raised as Python starts running it, before
    # its first line: atexit prints it and goes on, and the clusters were neither
    # waited for nor closed (their jobs ran on, kept for a client that was gone).
    # Terminate whatever is still open, as for any Ctrl-C at exit.
    left = live_clusters()
    if _terminating_at_exit or not left:
        return  # `_close_at_exit` got to it (a failure there was logged)
    if any(c._outstanding for c in left):
        logger.warning("interrupted at exit: the jobs not done are terminated")
    _terminate_open()


def _terminate_open() -> None:
    """Terminate the open clusters' jobs (within `EXIT_WAIT`) and close them."""
    global _terminating_at_exit
    _terminating_at_exit = True
    for cluster in reversed(live_clusters()):
        try:
            cluster._terminate(EXIT_WAIT)
        except Exception:
            logger.warning("closing cluster %r at exit failed", cluster.name)


def _interactive() -> bool:
    """Whether this process is an interactive session (an IPython shell or kernel,
    a REPL), whose clusters' jobs nobody waits for once it exits."""
    if hasattr(sys, "ps1") or sys.flags.interactive:
        return True
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    return get_ipython is not None and get_ipython() is not None


__all__ = [
    "EXIT_WAIT",
    "add_close_observer",
    "live_clusters",
    "register",
    "remove_close_observer",
    "unregister",
]
