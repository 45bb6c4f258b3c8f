"""`SharedJobCluster`: dispy's cluster on nodes shared through ``dispynb-scheduler``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from dispynb import config as dispy_config
from dispynb.backends.base import Departure, NodeInfo
from dispynb.cluster import JobCluster
from dispynb.defaults import NODE_PORT
from dispynb.errors import ClusterError, ConfigurationError
from dispynb.job import DispyJob
from dispynb.netoptions import _check_port
from dispynb.node import DispyNode, NodeAllocate, parse_node_specs
from dispynb.transport.addressing import format_address, parse_address

if TYPE_CHECKING:
    from dispynb.backends.scheduler import SchedulerBackend

logger = logging.getLogger(__name__)


class SharedJobCluster(JobCluster):
    """dispy's cluster for nodes shared with other clients through a scheduler.

    ``scheduler_host`` (``host`` or ``host:port``; port ``scheduler_port``,
    else ``dispy_port``, as ``dispynb-scheduler -p PORT`` pairs with it, else
    ``dispy.config.SharedSchedulerPort``) names a ``dispynb-scheduler``,
    which owns the nodes and shares their CPUs fairly between its users. The
    cluster proves its user's credential there: ``secret_file=`` the file that
    ``dispynb-scheduler user add NAME`` wrote (or ``secret=`` its content, or
    ``DISPYNB_SECRET_FILE``). ``exclusive=True`` asks for the nodes alone: the
    computation's jobs run once other users' running jobs ended, and no other
    user's job starts while it is open, if the scheduler's administrator lets
    its user (``dispynb-scheduler --exclusive_users``); otherwise it runs shared,
    with a warning saying whom to ask. Everything else is as for `JobCluster`,
    except that the scheduler manages the nodes: ``deallocate_node``,
    ``allocate_node``, ``set_node_cpus`` and ``close_node`` change this cluster's
    own use of a node (as dispy's; never other users'), ``resetup_node`` raises
    `NotSupportedError`; ``submit_node`` runs a job on the node given only, as
    dispy's (``Abandoned`` if that node leaves first). ``status()``,
    ``print_status()``, the web monitor and the notebook panels list the real
    nodes behind the scheduler, with this cluster's own jobs on each (never other
    users'); as in dispy, ``job.ip_addr`` and the ``cluster_status`` node of a job
    that ran name the node behind the scheduler, whose ``rx`` counts the results
    it sent.

    ``nodes`` (`NodeAllocate` objects, subclasses too, host patterns...) is asked
    about each node behind the scheduler, as dispy asks about each node it finds:
    a node it declines runs none of this cluster's jobs, one it gives fewer CPUs
    that many at once; every node is set up with the first one's ``setup_args``
    and ``depends``.

    ``scheduler_node`` (dispy's older name) is taken for ``scheduler_host``.
    Without ``scheduler_host`` it is a `JobCluster` on the nodes given: dispynb's
    node servers serve several clients at once.
    """

    def __init__(
        self,
        computation: Callable[..., Any] | str,
        nodes: Any = None,
        depends: list[Any] | None = None,
        job_status: Callable[[DispyJob], Any] | None = None,
        cluster_status: Callable[[int, DispyNode | None, DispyJob | None], Any]
        | None = None,
        *,
        scheduler_host: str | None = None,
        scheduler_port: int | None = None,
        client_port: int | None = None,
        exclusive: bool = False,
        scheduler_node: str | None = None,
        **options: Any,
    ) -> None:
        #: Nodes behind the scheduler this cluster closed (`close_node`), by id:
        #: `allocate_node` and `close_node` find them by any of their names, also
        #: while a close or a setup again is under way (not in its nodes then).
        self._closed_behind: dict[str, DispyNode] = {}
        #: Of those, the ones `allocate_node` named since: ``submit_node`` queues
        #: jobs for them, which run there once they are set up again.
        self._allocated_again: set[str] = set()
        if scheduler_node is not None:
            # dispy's name for it up to 4.10 (and in its documentation since).
            if scheduler_host is not None and scheduler_host != scheduler_node:
                raise ConfigurationError(
                    f"scheduler_node={scheduler_node!r} and scheduler_host="
                    f"{scheduler_host!r}: give one (scheduler_node is dispy's "
                    "older name of scheduler_host)"
                )
            scheduler_host = scheduler_node
        if scheduler_host is None:
            if exclusive:
                logger.warning(
                    "exclusive=True needs a scheduler (scheduler_host=): without "
                    "one the nodes stay shared with other clients"
                )
            super().__init__(
                computation, nodes, depends, job_status, cluster_status, **options
            )
            return
        from dispynb.backends.scheduler import SchedulerEngine

        host, port = parse_address(
            scheduler_host, scheduler_port or _scheduler_port(options.get("dispy_port"))
        )
        if scheduler_port is not None:
            port = scheduler_port
        address = format_address(host, port)
        # Each node behind the scheduler is asked of these, as dispy asks each node
        # it finds (subclasses' allocate() too): `SchedulerBackend.allot`.
        allocations = [] if nodes is None else parse_node_specs(nodes)
        per_node = any(
            type(a) is not NodeAllocate or a.host != "*" or a.cpus for a in allocations
        )
        spec = NodeAllocate(host, port=port)  # the scheduler, the one "node"
        if allocations:  # the computation is set up alike on every node
            spec.depends = allocations[0].depends
            spec.setup_args = allocations[0].setup_args
        if any(
            tuple(a.setup_args) != spec.setup_args or list(a.depends) != spec.depends
            for a in allocations
        ):
            logger.warning(
                "nodes=%r: through the scheduler at %s every node is set up with "
                "the first NodeAllocate's setup_args and depends",
                nodes,
                address,
            )
        super().__init__(
            computation,
            [spec],
            depends,
            job_status,
            cluster_status,
            engine=SchedulerEngine(
                address,
                exclusive=exclusive,
                allocations=allocations if per_node else [],
            ),
            **options,
        )

    def deallocate_node(self, node: Any) -> int:
        """Send ``node`` no more of this cluster's jobs; 0, or -1 (logged why).

        Through a scheduler, as dispy's: the scheduler sends this computation's
        jobs elsewhere (its jobs there finish; other users' jobs still go there),
        and ``submit_node`` to it returns None, until `allocate_node` gives it
        back (or the node leaves: when it comes back it is used again)."""
        if not self._shared():
            return super().deallocate_node(node)
        try:
            node_id = self._named_behind(node)
            self._manage(node_id, "deallocate_node", "deallocate")
        except ClusterError as exc:
            logger.warning("deallocate_node: %s", exc)
            return -1
        self._limit(node_id, None)
        return 0

    def allocate_node(self, node: Any) -> int:
        """Use ``node`` for this cluster's jobs again; 0, or -1 (logged why).

        Through a scheduler, as dispy's: a node `deallocate_node` took out (or
        `set_node_cpus` limited) gets this computation's jobs again, on all its
        CPUs; one `close_node` closed, or its ``nodes``' allocate() declined, is
        set up again (on all its CPUs, unasked). Only the scheduler's
        operator adds nodes (it sets the computation up on each of them): a node
        that is none of these cannot be allocated (-1)."""
        if not self._shared():
            return super().allocate_node(node)
        try:
            node_id = self._node_id(node, among=self._closed_behind)
            if node_id is None:  # one its NodeAllocate declined (dispy uses it)
                declined = getattr(self._backend, "declined_nodes", None)
                node_id = self._node_id(node, among=dict(declined or {}))
            if node_id is None:
                node_id = self._behind(node)
            used = self._manage(node_id, "allocate_node", "allocate")
        except ClusterError as exc:
            logger.warning("allocate_node: %s", exc)
            return -1
        self._deallocated.discard(node_id)
        self._limits_pending.pop(node_id, None)
        if node_id in self._closed_behind:
            self._allocated_again.add(node_id)
        if used > 0:  # all its CPUs again (a closed one comes back set up anew)
            self._used_cpus(node_id, used)
        return 0

    def _resize_node(self, node: Any, cpus: int | str) -> int:
        """`set_node_cpus`. Through a scheduler (dispy's allowed it only to an
        ``exclusive`` cluster, for every user's jobs): a limit of this cluster's
        own, at most ``cpus`` of its jobs at once on ``node`` (negative: all of
        the node's CPUs but that many; 0 is `deallocate_node`), never another
        user's use of the node. Returns the CPUs it may use there now."""
        if not self._shared():
            return super()._resize_node(node, cpus)
        node_id = self._named_behind(node)
        try:
            count = int(cpus)
        except (TypeError, ValueError):
            raise ClusterError(f"cpus={cpus!r} is not a number of CPUs") from None
        used = self._manage(node_id, "set_node_cpus", "cpus", cpus=count)
        self._limit(node_id, used)
        return used

    def close_node(self, node: Any, terminate_pending: bool = False) -> int:
        """Close this cluster's computation on ``node``; 0, or -1 (logged why).

        Through a scheduler, as dispy's: only this cluster's computation closes
        there (its cleanup runs; other users' jobs go on). Its running jobs there
        finish first (``terminate_pending`` terminates them: they end
        ``Terminated``, as dispy's); those submitted to
        it with ``submit_node`` that have not started are cancelled, and the
        others it held that had not started run on another node. The node leaves
        the cluster's nodes (``DispyNode.Closed``) and the scheduler does not set
        it up for this cluster again, not even when it comes back, until
        `allocate_node` names it."""
        if not self._shared():
            return super().close_node(node, terminate_pending)
        try:
            # (one closed, even allocated again, may not be back yet: still named)
            node_id = self._named_behind(node)
            known = self._nodes.get(node_id)
            self._manage(
                node_id, "close_node", "close", terminate=bool(terminate_pending)
            )
        except ClusterError as exc:
            logger.warning("close_node: %s", exc)
            return -1
        if known is not None:  # allocate_node finds it by any of its names
            self._closed_behind[node_id] = known
        self._allocated_again.discard(node_id)
        self._limits_pending.pop(node_id, None)
        return 0

    def _shared(self) -> bool:
        """Whether the cluster runs through a scheduler."""
        from dispynb.backends.scheduler import SchedulerEngine

        return isinstance(self.engine, SchedulerEngine)

    def _behind(self, node: Any) -> str:
        """The id of ``node`` among the nodes the scheduler runs this cluster on;
        `ClusterError` if it is none of them (or the cluster is closed)."""
        node_id = None if self._closed else self._node_id(node)
        if node_id is None:
            closed = " (the cluster is closed)" if self._closed else ""
            raise ClusterError(
                f"{node!r} is none of the nodes the scheduler runs this cluster "
                f"on{closed}"
            )
        return node_id

    def _returning(self, node: Any) -> str | None:
        if not self._shared():
            return super()._returning(node)
        again = {
            i: n for i, n in self._closed_behind.items() if i in self._allocated_again
        }
        return self._node_id(node, among=again)

    def _node_closed(self, info: NodeInfo, reason: str, departure: Departure) -> None:
        # One allocated again and lost is none of the cluster's nodes any more:
        # submit_node to it is refused, as to any node gone (if it comes back,
        # the scheduler sets it up for the cluster, allocated). One closed and
        # not allocated again stays named, for allocate_node to give it back.
        if departure is Departure.LOST and info.node_id in self._allocated_again:
            self._allocated_again.discard(info.node_id)
            self._closed_behind.pop(info.node_id, None)
        super()._node_closed(info, reason, departure)

    def _named_behind(self, node: Any) -> str:
        """`_behind`, or the id of a node this cluster closed (`close_node`): one
        closed, even allocated again, may not be back yet, its close or its setup
        again under way, and is still named."""
        return self._node_id(node, among=self._closed_behind) or self._behind(node)

    def _apply_limit(self, node_id: str, used: int | None, tell: bool = True) -> None:
        super()._apply_limit(node_id, used, tell)
        if used == 0 and self._shared():  # set_node_cpus(0) is deallocate_node here
            self._deallocated.add(node_id)

    def _manage(
        self,
        node_id: str,
        what: str,
        action: str,
        cpus: int = 0,
        terminate: bool = False,
    ) -> int:
        """Have the scheduler apply ``action`` to the node for ``what``, the
        user's method; the CPUs it answered, or `ClusterError` saying why not."""
        backend = cast("SchedulerBackend | None", self._backend)
        if backend is None or self._closed:  # (a closed one's answers no more)
            raise ClusterError("the cluster is closed")
        error, used = backend.manage_node(node_id, action, what, cpus, terminate)
        if error:
            raise ClusterError(error)
        return used

    def node_jobs(self, node: Any, from_node: bool = False) -> list[DispyJob] | int:
        """The jobs of this cluster running on ``node`` now; ``[]`` for a node the
        scheduler does not use for it (dispy's SharedJobCluster, where `JobCluster`
        returns -1)."""
        jobs = super().node_jobs(node, from_node)
        return [] if jobs == -1 else jobs


def _scheduler_port(dispy_port: Any) -> int:
    """The scheduler's port when ``scheduler_host`` names none: ``dispy_port``
    (or ``dispy.config.DispyPort``, which dispy's keyword sets) if given, as
    dispy's scripts pair ``dispyscheduler.py -p P`` with it and
    ``dispynb-scheduler -p P`` listens on P (as ``dispynb-node -p P`` pairs with
    a `JobCluster`'s); else ``dispy.config.SharedSchedulerPort``."""
    port = _check_port(dispy_port)
    if port is None and dispy_config.DispyPort != NODE_PORT - 1:
        port = _check_port(dispy_config.DispyPort, "dispy.config.DispyPort")
    return dispy_config.SharedSchedulerPort if port is None else port
