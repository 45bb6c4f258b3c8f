"""`SharedJobCluster`: dispy's cluster on nodes shared through ``dispynb-scheduler``."""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from dispynb import config as dispy_config
from dispynb.cluster import JobCluster
from dispynb.errors import ConfigurationError
from dispynb.job import DispyJob
from dispynb.node import DispyNode, NodeAllocate
from dispynb.transport.addressing import format_address, parse_address

if TYPE_CHECKING:
    from dispynb.backends.scheduler import SchedulerBackend

logger = logging.getLogger(__name__)


class SharedJobCluster(JobCluster):
    """dispy's cluster for nodes shared with other clients through a scheduler.

    ``scheduler_host`` (``host`` or ``host:port``; port
    ``dispy.config.SharedSchedulerPort`` by default) names a ``dispynb-scheduler``,
    which owns the nodes and shares their CPUs fairly between its users. The
    cluster proves its user's credential there: ``secret_file=`` the file that
    ``dispynb-scheduler user add NAME`` wrote (or ``secret=`` its content, or
    ``DISPYNB_SECRET_FILE``). ``exclusive=True`` asks for the nodes alone: the
    computation's jobs run once other users' running jobs ended, and no other
    user's job starts while it is open. Everything else is as for `JobCluster`,
    except that the scheduler manages the nodes: ``deallocate_node`` and
    ``allocate_node`` take a node out of this cluster's use and give it back (as
    dispy's), ``set_node_cpus``, ``close_node`` and ``resetup_node`` raise
    `NotSupportedError`;
    ``submit_node`` runs a job on the node given only, as dispy's (``Abandoned``
    if that node leaves first). ``status()``, ``print_status()``, the web monitor
    and the notebook panels list the real nodes behind the scheduler, with this
    cluster's own jobs on each (never other users'); as in dispy, ``job.ip_addr``
    and the ``cluster_status`` node of a job that ran name the node behind the
    scheduler, whose ``rx`` counts the results it sent.

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
            scheduler_host, scheduler_port or dispy_config.SharedSchedulerPort
        )
        if scheduler_port is not None:
            port = scheduler_port
        address = format_address(host, port)
        given = nodes if isinstance(nodes, list | tuple) else [nodes]
        allocations = [n for n in given if isinstance(n, NodeAllocate)]
        spec: NodeAllocate | str = address
        if allocations:
            # Its setup_args, depends and allocate() apply, on the scheduler's nodes.
            spec = copy.copy(allocations[0])
            spec.host, spec.port = host, port
            spec.ip_addr = host
            spec.ip_rex = re.escape(host)
        if len(allocations) > 1 or any(
            n not in (None, "*") and not isinstance(n, NodeAllocate) for n in given
        ):
            logger.warning(
                "nodes=%r: the scheduler at %s decides which nodes run the jobs "
                "(the first NodeAllocate's setup_args and depends apply to all)",
                nodes,
                address,
            )
        super().__init__(
            computation,
            [spec],
            depends,
            job_status,
            cluster_status,
            engine=SchedulerEngine(address, exclusive=exclusive),
            **options,
        )

    def deallocate_node(self, node: Any) -> int:
        """Send ``node`` no more of this cluster's jobs; 0, or -1 (logged why).

        Through a scheduler, as dispy's: the scheduler sends this computation's
        jobs elsewhere (its jobs there finish; other users' jobs still go there),
        and ``submit_node`` to it returns None, until `allocate_node` gives it
        back (or the node leaves: when it comes back it is used again)."""
        shared, node_id = self._through_scheduler("deallocate_node", node)
        if not shared:
            return super().deallocate_node(node)
        if not node_id or self._manage(node_id, "deallocate", "deallocate_node"):
            return -1
        self._deallocated.add(node_id)
        return 0

    def allocate_node(self, node: Any) -> int:
        """Use ``node`` for this cluster's jobs again; 0, or -1 (logged why).

        Through a scheduler, as dispy's: a node `deallocate_node` took out gets
        this computation's jobs again. Only the scheduler's operator adds nodes
        (it sets the computation up on each of them): a node that is not one of
        this cluster's cannot be allocated (-1)."""
        shared, node_id = self._through_scheduler("allocate_node", node)
        if not shared:
            return super().allocate_node(node)
        if not node_id or self._manage(node_id, "allocate", "allocate_node"):
            return -1
        self._deallocated.discard(node_id)
        return 0

    def _through_scheduler(self, what: str, node: Any) -> tuple[bool, str]:
        """Whether the cluster runs through a scheduler, and then the id of
        ``node`` among its nodes ("" if it is none of them, or the cluster is
        closed: logged, with ``what``, the user's method)."""
        from dispynb.backends.scheduler import SchedulerEngine

        if not isinstance(self.engine, SchedulerEngine):
            return False, ""
        node_id = None if self._closed else self._node_id(node)
        if node_id is None:
            logger.warning(
                "%s: %r is none of the nodes the scheduler runs this cluster on%s",
                what,
                node,
                " (the cluster is closed)" if self._closed else "",
            )
        return True, node_id or ""

    def _manage(self, node_id: str, action: str, what: str) -> int:
        """Have the scheduler apply ``action`` to the node; 0, or -1 (logged)."""
        backend = cast("SchedulerBackend | None", self._backend)
        error = (
            "the cluster is closed"
            if backend is None
            else backend.manage_node(node_id, action, what)
        )
        if error:
            logger.warning("%s: %s", what, error)
            return -1
        return 0

    def node_jobs(self, node: Any, from_node: bool = False) -> list[DispyJob] | int:
        """The jobs of this cluster running on ``node`` now; ``[]`` for a node the
        scheduler does not use for it (dispy's SharedJobCluster, where `JobCluster`
        returns -1)."""
        jobs = super().node_jobs(node, from_node)
        return [] if jobs == -1 else jobs
