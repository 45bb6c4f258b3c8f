"""The open clusters of this process: listed for monitors, closed at interpreter exit.

`JobCluster` registers itself here when it is created and unregisters when it
closes; `live_clusters` lists the others (`dispynb.monitoring`, the lab panel). At
interpreter exit the clusters a program did not close are closed, as dispy does.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import weakref
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


def register(cluster: JobCluster) -> int:
    """List ``cluster`` (and close it at exit if still open); its id."""
    global _exit_hooked
    cluster_id = next(_ids)
    _live[cluster_id] = weakref.ref(cluster)
    with _exit_hook:
        if not _exit_hooked:
            atexit.register(_close_at_exit)
            _exit_hooked = True
    return cluster_id


def unregister(cluster_id: int) -> None:
    """The cluster closed."""
    _live.pop(cluster_id, None)


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


__all__ = ["EXIT_WAIT", "live_clusters", "register", "unregister"]
