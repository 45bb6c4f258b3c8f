"""The node engine's reports: the driver's, in terms of `NodeLink`, passed on as
the seam's `JobEvents`, in terms of `NodeInfo` (`dispynb.backends.base`).

`NodeReports` is the part of `NodesBackend` that the `Driver` reports to (its
`dispynb.scheduler.link.JobEvents`): nodes ready, failed, closed or reporting
their load, and jobs sent, running, done, abandoned, cancelled or requeued. All
on the cluster's I/O loop. A `SchedulerBackend` names, for each job, the node
behind the scheduler that ran it (`_job_view`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import AbstractContextManager
from typing import Any

from dispynb.backends import base
from dispynb.backends._nodesettings import avail_info
from dispynb.backends.base import Departure, JobEvents, NodeInfo
from dispynb.backends.finder import NodeFinder
from dispynb.backends.jobfiles import save_job_file, unsaved_file
from dispynb.errors import DispynbError, MessageError, ProtocolError
from dispynb.node import DispyNodeAvailInfo
from dispynb.options import ClusterOptions
from dispynb.protocol.messages import ABANDONED, JobsPlaced, SchedulerNodes
from dispynb.protocol.records import avail_figures
from dispynb.scheduler.driver import Driver, NodeLink, Outcome
from dispynb.status import status_of
from dispynb.transport.addressing import parse_address

# The node engine's records, under its module's name (`%dispy` holds them back
# while a cell starts: `dispynb.jupyter.magicsupport`).
logger = logging.getLogger("dispynb.backends.nodes")


class NodeReports:
    """The driver's reports to a `NodesBackend`, passed on to the façade (a mixin:
    the backend gives the attributes below)."""

    driver: Driver
    _events: JobEvents
    _options: ClusterOptions
    _closed: bool
    _finder: NodeFinder | None
    #: Ready nodes as the façade knows them, by node id.
    _info: dict[str, NodeInfo]
    #: Nodes warned of for a malformed resource report (`_reported_avail`).
    _malformed_avail: set[str]
    #: Set once a first node is ready (`NodesBackend.start` waits for it).
    _startup: asyncio.Future[None] | None
    _node_errors: list[DispynbError]
    #: Job key -> the node that reported it started (`running_jobs`).
    _started: dict[int, str]

    def _view(self, link: NodeLink) -> NodeInfo:
        """The `NodeInfo` the façade knows for ``link``'s node."""
        info = self._info.get(link.node_id)
        if info is None:  # not (or no longer) ready: its identity is enough
            welcome = link.welcome
            info = NodeInfo(
                link.node_id,
                link.peer_ip or link.host,
                link.port,
                welcome.name if welcome else "",
                link.cpus,
                welcome.platform if welcome else "",
            )
        return info

    def node_ready(self, link: NodeLink) -> None:
        welcome = link.welcome
        info = NodeInfo(
            link.node_id,
            link.peer_ip or link.host,  # a named node by its address, as in dispy
            link.port,
            welcome.name if welcome else "",
            link.cpus,
            welcome.platform if welcome else "",
            self._reported_avail(link.node_id, welcome.avail) if welcome else None,
            offered=welcome.cpus if welcome else 0,
        )
        self._info[link.node_id] = info
        self._events.node_ready(info)
        if self._startup is not None and not self._startup.done():
            self._startup.set_result(None)

    def node_failed(self, link: NodeLink, error: DispynbError) -> None:
        self._node_errors.append(error)
        startup = self._startup
        if (
            startup is not None
            and not startup.done()
            and not self.driver.connecting
            # With ping_interval the named nodes not up yet are waited for, as
            # dispy's; otherwise no node listening stops JobCluster() at once.
            and not (self._options.ping_interval and self.driver.reconnecting)
            and not any(link.ready for link in self.driver.nodes.values())
        ):
            first, *others = self._node_errors
            if others:
                # The first's reason is the exception raised (after this line in
                # a script): said once. A notebook puts them together, by this
                # record's argument (`dispynb.jupyter.magicsupport`).
                logger.error(
                    "no node could be used (the error raised is the first's): %s",
                    "; ".join(str(e) for e in others),
                )
            startup.set_exception(first)
        elif (
            startup is not None
            and not startup.done()
            and self._options.ping_interval
            and self.driver.reconnecting
        ):
            # JobCluster() waits for the named nodes (ping_interval): say why now.
            self.driver.release_failure_warnings()

    def node_closed(self, link: NodeLink, reason: str) -> None:
        if self._finder is not None and not link.resetting:
            self._finder.forget(link.host, link.port)
        info = self._info.pop(link.node_id, None) or self._view(link)
        if link.resetting:
            departure = Departure.RESETUP
        elif link.releasing or self._closed:
            departure = Departure.RELEASED
        else:
            departure = Departure.LOST
        self._events.node_closed(info, reason, departure)

    def node_status(self, link: NodeLink, avail: list[float | None]) -> None:
        info = self._info.get(link.node_id)
        if info is not None:
            self._events.node_status(info, self._reported_avail(link.node_id, avail))

    def _reported_avail(self, node: str, avail: Any) -> DispyNodeAvailInfo | None:
        """A node's resource report as `avail_info`; a malformed one (only a
        node holding the secret can send it) is unknown, said once per node."""
        try:
            return avail_info(avail_figures(avail))
        except MessageError as exc:
            if node not in self._malformed_avail:
                self._malformed_avail.add(node)
                logger.warning(
                    "node %s: %s; its resources are shown as unknown (is it "
                    "dispynb's node server, of this version?)",
                    node,
                    exc,
                )
            return None

    def scheduler_nodes(self, link: NodeLink, report: SchedulerNodes) -> None:
        """Only a shared scheduler reports nodes behind it (`SchedulerBackend`)."""
        logger.debug("node %s sent a scheduler's node list: ignored", link.node_id)

    def jobs_placed(self, link: NodeLink, placed: JobsPlaced) -> None:
        """Only a shared scheduler places jobs on nodes behind it."""
        logger.debug("node %s sent a scheduler's job placement: ignored", link.node_id)

    def _job_view(self, key: int, link: NodeLink) -> NodeInfo:
        """The node the façade names for job ``key``, which ``link`` reported:
        ``link``'s (a scheduler names the node behind it, `SchedulerBackend`)."""
        return self._view(link)

    def jobs_sent(self, keys: list[int], link: NodeLink) -> None:
        self._events.jobs_sent(keys, self._view(link))

    def job_running(self, key: int, link: NodeLink, start_time: float) -> None:
        self._started[key] = link.node_id
        self._events.job_running(key, self._job_view(key, link), start_time)

    def job_provisional(self, key: int, link: NodeLink, result: Any) -> None:
        self._started.setdefault(key, link.node_id)  # a start not reported
        self._events.job_provisional(key, self._job_view(key, link), result)

    def job_file(
        self, key: int, link: NodeLink, path: str, data: list[memoryview]
    ) -> str:
        """A job sent a file (``dispy_send_file``): save it under ``files_dir``;
        return why it was not saved ("" once it was), for the job."""
        files_dir = self._options.files_dir
        node = self._job_view(key, link).node_id  # behind a scheduler: that node
        if len(data) != 1:
            error = unsaved_file(
                files_dir or os.getcwd(),
                path,
                ProtocolError("a file from a node comes in one buffer"),
            )
            logger.warning(
                "file from job %d on node %s not saved: %s", key, node, error
            )
            return error
        return save_job_file(files_dir, key, path, data[0], logger=logger, node=node)

    def job_done(self, key: int, link: NodeLink | None, outcome: Outcome) -> None:
        self._started.pop(key, None)
        if outcome.outcome == ABANDONED:  # a scheduler lost the node that ran it
            self.job_abandoned(key, link, outcome.exception or "its node was lost")
            return
        self._events.job_done(
            key,
            self._job_view(key, link) if link is not None else None,
            base.Outcome(
                status_of(outcome.outcome),
                outcome.result,
                outcome.stdout,
                outcome.stderr,
                outcome.exception,
                outcome.start_time,
                outcome.end_time,
            ),
        )

    def job_abandoned(
        self, key: int, link: NodeLink | None, reason: str, node_id: str = ""
    ) -> None:
        self._started.pop(key, None)
        info: NodeInfo | None = None
        if link is not None:
            info = self._job_view(key, link)
        elif node_id:  # the node it was sent to, gone now (dispy names it)
            host, port = parse_address(node_id)
            info = NodeInfo(node_id, host, port, "", 0)
        self._events.job_abandoned(key, info, reason)

    def job_cancelled(self, key: int) -> None:
        self._started.pop(key, None)
        self._events.job_cancelled(key)

    def jobs_cancelled(self, keys: list[int]) -> None:
        started = self._started
        if started:
            for key in keys:
                started.pop(key, None)
        self._events.jobs_cancelled(keys)

    def job_requeued(self, key: int) -> None:
        self._started.pop(key, None)
        self._events.job_requeued(key)

    def batch(self) -> AbstractContextManager[None]:
        return self._events.batch()


__all__ = ["NodeReports"]
