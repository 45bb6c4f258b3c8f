"""The state every part of `JobCluster` shares, and what each part uses: the
engine's features, finding a node of the cluster, and telling the callbacks and
the listeners of an event."""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dispynb._callbacks import CallbackDispatcher
from dispynb._interruptible import Sleepers
from dispynb._loop import LoopRunner
from dispynb._puthint import RepeatedArguments
from dispynb.backends import base
from dispynb.backends.base import Backend, Engine
from dispynb.clusterjournal import ClusterJournal
from dispynb.globalwatch import GlobalWatch
from dispynb.job import DispyJob
from dispynb.node import DispyNode, split_address
from dispynb.options import ClusterOptions
from dispynb.tracebacks import LazySourceMap

if TYPE_CHECKING:
    from dispynb._clusterevents import _Batch

logger = logging.getLogger("dispynb.cluster")


#: A listener gets ``(status, node, job)`` for each job and node event; see
#: `JobCluster.add_listener`.
Listener = Callable[[int, DispyNode | None, DispyJob | None], None]


def _names(text: str, node_id: str, node: DispyNode) -> bool:
    """Whether ``text`` is ``node``'s ``'address:port'`` or the host it was named by
    (the host part of its ``'host:port'`` id; other engines' ids have other shapes)."""
    named = split_address(node_id)
    if named is not None and text == named[0]:
        return True
    return split_address(text) == (node.ip_addr, node.port)


class _ClusterState:
    """A `JobCluster`'s state (its parts: `_clusterevents`, the engine's events;
    `_clusterjobs`, submitting and cancelling jobs; `_clusternodes`, dispy's node
    methods)."""

    # Set by `JobCluster.__init__` (see there).
    _options: ClusterOptions
    engine: Engine
    _features: frozenset[str]
    _journal: ClusterJournal
    name: str
    _jobs: dict[int, DispyJob]
    _keys: itertools.count[int]
    _objects: dict[str, Any]
    _objects_dir: str | None
    _repeats: RepeatedArguments
    job_counts: Counter[str]
    _listeners: list[Listener]
    _outstanding: int
    _submitted: int
    _outstanding_lock: threading.Lock
    _all_done: Sleepers
    _nodes: dict[str, DispyNode]
    _node_cpus: dict[str, int]
    _deallocated: set[str]
    _limits_pending: dict[str, int | None]
    _resetting: dict[str, DispyNode]
    _released_nodes: dict[str, DispyNode]
    _avail_told: dict[str, float]
    _executing: dict[int, DispyNode]
    _cancel_asked: set[int]
    # Jobs ended in the current `_Events._batch` (nested ``_batch_depth`` deep),
    # journaled and announced as it ends: ``(key, job, node)``.
    _batch_context: _Batch
    _batch_depth: int
    _ending: list[tuple[int, DispyJob, DispyNode | None]]
    _closed: bool
    _backend: Backend | None
    _sources: LazySourceMap
    _globals: GlobalWatch
    end_time: float | None
    cpu_time: float
    _callbacks: CallbackDispatcher
    _runner: LoopRunner

    def _require(self, feature: str, what: str) -> None:
        """Raise `NotSupportedError` unless the engine provides ``feature``."""
        if feature not in self._features:
            base.require(self.engine, feature, what)

    def _node_id(
        self, node: Any, among: dict[str, DispyNode] | None = None
    ) -> str | None:
        """The id of ``node`` (a `DispyNode`, or a node's address, ``'host:port'``,
        name, or the host it was named by), or None if it is not one of ours (of
        ``among``, nodes by id, if given)."""
        for node_id, known in list((self._nodes if among is None else among).items()):
            if node is known or node in (node_id, known.ip_addr, known.name):
                return node_id
            if isinstance(node, str) and _names(node, node_id, known):
                return node_id
            if isinstance(node, DispyNode) and (node.ip_addr, node.port) == (
                known.ip_addr,
                known.port,
            ):
                return node_id
        return None

    def _returning(self, node: Any) -> str | None:
        """The id of ``node`` if it is being set up again for the cluster
        (`_clusternodes._Nodes`), else None."""
        return None

    def _limit(self, node_id: str, used: int | None) -> None:
        """``node_id`` runs ``used`` of the cluster's jobs at once now (None:
        `deallocate_node`, which leaves its CPUs as shown), kept in
        ``_limits_pending`` for its next setup (`_Events._node_ready`)."""
        self._limits_pending[node_id] = used
        self._apply_limit(node_id, used)

    def _apply_limit(self, node_id: str, used: int | None, tell: bool = True) -> None:
        if used is None:
            self._deallocated.add(node_id)  # submit_node refuses it, as dispy's
        else:
            self._used_cpus(node_id, used, tell)

    def _used_cpus(self, node_id: str, used: int, tell: bool = True) -> None:
        """``node_id`` uses ``used`` CPUs now: its `DispyNode` says so (listeners
        hear `DispyNode.AvailInfo` if ``tell``), and a positive count gives it
        back (`deallocate_node`)."""
        if used > 0:
            self._deallocated.discard(node_id)
        known = self._nodes.get(node_id)
        if known is not None:
            known.cpus = used  # avail_cpus stays what it offers, as dispy's
            if tell:
                self._emit(DispyNode.AvailInfo, known, None)

    def _notify_cluster(
        self, status: int, node: DispyNode | None, job: DispyJob | None
    ) -> None:
        if self._options.cluster_status is not None:
            self._callbacks.post(self._options.cluster_status, status, node, job)

    # -- listeners (monitors) ----------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(status, node, job)`` for each job and node event.

        The statuses are ``cluster_status``'s, but a listener is called at once on
        the thread where the event happens (the I/O thread; the submitting thread
        for ``Created``) with the live `DispyJob` and `DispyNode`: it must be quick,
        must not block and must not change them. Monitors use this; programs
        should use ``cluster_status``.
        """
        self._listeners = [*self._listeners, listener]

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        self._listeners = [fn for fn in self._listeners if fn is not listener]

    def _emit(self, status: int, node: DispyNode | None, job: DispyJob | None) -> None:
        for listener in self._listeners:  # replaced, never mutated: safe to iterate
            try:
                listener(status, node, job)
            except Exception:
                logger.exception("cluster listener %r failed", listener)
