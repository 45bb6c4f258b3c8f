"""A `JobCluster`'s dispy node methods: files sent to a node, nodes allocated,
deallocated, resized, closed or set up again, and the jobs running on one."""

from __future__ import annotations

import logging
from typing import Any

from dispynb._clusterstate import _ClusterState
from dispynb.backends import base
from dispynb.backends.base import Backend
from dispynb.depends import file_ref
from dispynb.errors import ClusterError, ConfigurationError, DispynbError
from dispynb.job import DispyJob
from dispynb.node import DispyNode, parse_node_specs

logger = logging.getLogger("dispynb.cluster")


class _Nodes(_ClusterState):
    """dispy's node-management methods."""

    def send_file(self, path: str, node: Any, relay: bool = False) -> int:
        """Copy a file into the computation's directory on ``node`` (dispy's method).

        The file keeps its path relative to the current directory when it is below
        it, else its base name. Returns 0, or -1 (with the reason logged) if it could
        not be sent, e.g. over the node's maximum file size. ``relay`` is accepted
        for dispy compatibility. As on dispy's nodes, the files sent stay through
        `resetup_node` (one sent as it goes on arrives with the setup again), not
        through `close_node`.
        """
        self._require(base.SEND_FILE, "send_file")
        if self._closed or self._backend is None:
            logger.warning("send_file: the cluster is closed")
            return -1
        node_id = self._node_id(node) or self._returning(node)  # (resetup_node)
        if node_id is None:
            logger.warning("send_file: %r is not a node of this cluster", node)
            return -1
        try:
            ref = file_ref(path, "send_file")
        except DispynbError as exc:
            logger.warning("%s", exc)  # it names send_file
            return -1
        error = self._backend.send_file(node_id, ref)
        if error:
            logger.warning("send_file: %s", error)
            return -1
        return 0

    def allocate_node(self, node: Any) -> int:
        """Use ``node`` (any node spec, or several) for this computation.

        A node not yet used is connected and set up; one taken out with
        `deallocate_node` gets jobs again. Returns 0, or -1 for a bad spec or none
        (logged), as dispy's.
        """
        self._require(base.NODE_MANAGEMENT, "allocate_node")
        try:
            specs = parse_node_specs(node)
        except ConfigurationError as exc:
            logger.warning("allocate_node: %s", exc)
            return -1
        if not specs:
            logger.warning("allocate_node: no node given (%r): nothing allocated", node)
            return -1
        if self._closed or self._backend is None:
            logger.warning("allocate_node: the cluster is closed")
            return -1
        try:
            self._backend.add_nodes(specs)
        except (OSError, DispynbError) as exc:
            logger.warning("allocate_node: cannot discover nodes: %s", exc)
            return -1
        # Back in use, all of them: submit_node takes them.
        for node_id in {*self._deallocated, *self._limits_pending}:
            known = self._nodes.get(node_id)
            if known is None or any(
                spec.port in (None, known.port)
                and spec.matches(known.ip_addr, known.name)
                for spec in specs
            ):
                self._deallocated.discard(node_id)
                self._limits_pending.pop(node_id, None)
        return 0

    def discover_nodes(self, nodes: Any) -> int:
        """Look for ``nodes``: wildcards by broadcast, explicit hosts by connecting."""
        return self.allocate_node(nodes)

    def _managed(self, node: Any, what: str) -> tuple[Backend, str] | None:
        """The backend and ``node``'s id for a node-management method, or None for
        a node not of this cluster (or a closed cluster)."""
        self._require(base.NODE_MANAGEMENT, what)
        node_id = None if self._closed else self._node_id(node)
        if node_id is None or self._backend is None:
            return None
        return self._backend, node_id

    def deallocate_node(self, node: Any) -> int:
        """Send ``node`` no more jobs (its computation stays set up); 0 or -1.

        A node being set up (again: `allocate_node` named it, maybe as its
        `close_node` went on) gets none once it is set up: the last call decides.
        """
        managed = self._managed(node, "deallocate_node") or self._pending(node)
        if managed is None:
            return self._refused("deallocate_node", node)
        backend, node_id = managed
        if backend.set_cpus(node_id, 0) < 0:
            return self._refused("deallocate_node", node, node_id)
        self._limit(node_id, None)
        return 0

    def _refused(self, what: str, node: Any, node_id: str | None = None) -> int:
        """-1, for dispy's node method ``what`` that could not act on ``node``,
        with the reason logged (as `set_node_cpus` and `allocate_node` give it).
        ``node_id``: the node's, if it is one of the cluster's nodes."""
        if node_id is not None:
            why = f"node {node_id} is not set up for this cluster now"
        elif self._closed or self._backend is None:
            why = "the cluster is closed"
        elif (released := self._node_id(node, among=self._released_nodes)) is not None:
            why = (
                f"node {released} was released (close_node): allocate_node gives "
                "it back"
            )
        else:
            why = f"{node!r} is not a node of this cluster"
        logger.warning("%s: %s", what, why)
        return -1

    def set_node_cpus(self, node: Any, cpus: int | str) -> int:
        """Use ``cpus`` CPUs of ``node`` (negative: all but that many).

        Returns the CPUs now used, or -1 (logged why) for an unknown node or a
        ``cpus`` that is not a number. As in dispy, ``cpus`` may be a string
        (``"2"``), and a negative one larger than the node's CPUs changes nothing.
        A node never gets more jobs at once than it set up workers for.
        """
        try:
            return self._resize_node(node, cpus)
        except ClusterError as exc:
            logger.warning("set_node_cpus: %s", exc)
            return -1

    def _resize_node(self, node: Any, cpus: int | str) -> int:
        """`set_node_cpus`, raising `ClusterError` saying why it cannot (what the
        web monitor tells its user)."""
        managed = self._managed(node, "set_node_cpus") or self._pending(node)
        if managed is None and (self._closed or self._backend is None):
            raise ClusterError("the cluster is closed")
        if managed is None:
            raise ClusterError(f"{node!r} is not a node of this cluster")
        backend, node_id = managed
        known = self._nodes.get(node_id)
        try:
            cpus = int(cpus)
        except (TypeError, ValueError):
            raise ClusterError(f"cpus={cpus!r} is not a number of CPUs") from None
        if cpus < 0:
            if self._node_cpus.get(node_id, 0) + cpus < 0:  # dispy leaves it so
                return known.cpus if known is not None else -1
            cpus = self._node_cpus.get(node_id, 0) + cpus
        used = backend.set_cpus(node_id, cpus)
        if used < 0:
            raise ClusterError(f"node {node_id} is not set up for this cluster now")
        self._limit(node_id, used)
        return used

    def close_node(self, node: Any, terminate_pending: bool = False) -> int:
        """Close the computation on ``node`` (running its cleanup) and release it.

        Its running jobs finish first (``terminate_pending`` terminates them: they
        end ``Terminated``, result None, as dispy's node reports them); jobs
        submitted to it with `submit_node` that have not started are cancelled, and
        other jobs it held that had not started (sent ahead behind a running one) go
        back to the queue, to run on another node, as in dispy. The
        node is not set up again for this cluster, not even when discovery finds it
        again, until `allocate_node` names it (or a pattern it matches); meanwhile
        jobs no other node can run wait in the queue, as in dispy. A node
        `allocate_node` named and not yet set up (again) is closed as soon as it is;
        the last of close_node and allocate_node called decides. Returns 0, or -1
        if ``node`` is not a node of this cluster.
        """
        managed = self._managed(node, "close_node") or self._pending(node)
        if managed is None:
            return self._refused("close_node", node)
        backend, node_id = managed
        self._limits_pending.pop(node_id, None)  # (allocate_node: all of it)
        if not backend.close_node(node_id, terminate_pending):
            return self._refused("close_node", node, node_id)
        return 0

    def _pending(self, node: Any) -> tuple[Backend, str] | None:
        """The backend and ``node``'s id if it is being connected or set up (again)
        for this cluster: not one of its nodes yet, though `allocate_node` named it
        (or named it again while a `close_node` was under way)."""
        links = getattr(self._backend, "node_links", None)
        if self._closed or self._backend is None or links is None:
            return None  # (a closed one's engine answers no more)
        among = dict(self._resetting)
        for node_id, host, port in links():
            among.setdefault(node_id, DispyNode(host, port=port))
        node_id = self._node_id(node, among)
        return None if node_id is None else (self._backend, node_id)

    def _returning(self, node: Any) -> str | None:
        pending = self._pending(node)
        return None if pending is None else pending[1]

    def resetup_node(self, node: Any, terminate_pending: bool = False) -> int:
        """Close the computation on ``node`` and set it up again.

        `NodeAllocate.allocate` runs again, so new per-node ``depends`` and
        ``setup_args`` take effect (dispy's way to replace in-memory data). On a
        node being set up (again) it returns 0 too: the node is set up anew once
        that setup is over, its ``allocate`` asked after this call.
        """
        managed = self._managed(node, "resetup_node") or self._pending(node)
        if managed is None:
            return self._refused("resetup_node", node)
        backend, node_id = managed
        self._limits_pending.pop(node_id, None)  # all of it once set up again
        if not backend.resetup_node(node_id, terminate_pending):
            return self._refused("resetup_node", node, node_id)
        return 0

    def node_jobs(self, node: Any, from_node: bool = False) -> list[DispyJob] | int:
        """The jobs of this cluster running on ``node`` now; -1 (as dispy's) for a
        node that is not one of this cluster's, or a closed cluster. A node it
        released (`close_node`, which `print_status` still lists) or sets up
        again runs none of them: ``[]``, as dispy's, whose cluster keeps it."""
        self._require(base.NODE_JOBS, "node_jobs")
        if self._closed:  # closing: as dispy's, whose cluster forgot its nodes
            return -1
        node_id = self._node_id(node)
        if node_id is None or self._backend is None:
            if self._backend is not None and (
                self._node_id(node, among=self._released_nodes) is not None
                or self._returning(node) is not None
            ):
                return []
            return -1
        keys = self._backend.running_jobs(node_id)
        return [job for key in keys if (job := self._jobs.get(key)) is not None]
