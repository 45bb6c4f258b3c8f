"""`SharedJobCluster`: dispy's cluster on nodes shared with other clients."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from dispynb.cluster import JobCluster
from dispynb.errors import ConfigurationError
from dispynb.job import DispyJob
from dispynb.node import DispyNode

logger = logging.getLogger(__name__)


class SharedJobCluster(JobCluster):
    """dispy's cluster for nodes shared with other clients.

    In dispy a separate scheduler program shares nodes among clients. dispynb's node
    servers are shared by design: several clients' computations run on a node at
    once, isolated in their own processes, with its CPUs shared fairly among them. So
    this is a `JobCluster` that also accepts dispy's ``client_port`` and
    ``exclusive`` keywords (neither is needed); name the nodes with ``nodes=``.

    Raises
    ------
    ConfigurationError
        If ``scheduler_host`` is given: there is no dispynb scheduler program to
        connect to; give the nodes instead.
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
        client_port: int | None = None,
        exclusive: bool = False,
        **options: Any,
    ) -> None:
        if scheduler_host is not None:
            raise ConfigurationError(
                "dispynb has no shared scheduler program: its node servers serve "
                "several clients at once, so pass the nodes (nodes=[...]) instead of "
                f"scheduler_host={scheduler_host!r}"
            )
        if exclusive:
            logger.warning(
                "exclusive=True is not supported: the nodes stay shared with other "
                "clients (each computation runs in its own processes)"
            )
        super().__init__(
            computation, nodes, depends, job_status, cluster_status, **options
        )
