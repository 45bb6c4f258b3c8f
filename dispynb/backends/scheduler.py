"""A shared scheduler (``dispynb-scheduler``) as the engine under `SharedJobCluster`.

The scheduler speaks the node protocol to its clients, so this engine is dispynb's
node engine (`NodesBackend`) pointed at one "node", the scheduler, whose CPUs are
those of the nodes it shares out. It proves the user's credential
(``dispynb-user:NAME:TOKEN``, see `dispynb.secret.split_credential`) instead of the
node secret, and tells the scheduler whether the computation wants the nodes to
itself (``exclusive``).

The cluster shows the nodes behind the scheduler, not the scheduler: it reports them
to each computation (`SchedulerNodes`, with that computation's own counts on each),
and `SchedulerBackend` turns the reports into node events for the façade, so that
``status()``, ``print_status()``, the web monitor and the notebook panels list the
real nodes. Jobs go to the scheduler, which chooses their nodes, except for a job
pinned to one (``submit_node``): the scheduler runs it there and nowhere else (it
ends ``Abandoned`` if that node leaves first). This computation's use of a node
is its own to manage (``deallocate_node``, ``allocate_node``, ``set_node_cpus``,
``close_node``: `SchedulerBackend.manage_node`, which `SharedJobCluster` calls),
never another user's; adding nodes or setting them up again (``resetup_node``) is
the operator's.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from typing import Any

from dispynb.backends import base
from dispynb.backends._nodesettings import avail_info
from dispynb.backends.base import ClusterConfig, Departure, JobEvents, NodeInfo
from dispynb.backends.nodes import NodeEngine, NodesBackend
from dispynb.depends import FileRef
from dispynb.errors import ConfigurationError, MessageError, NotSupportedError
from dispynb.node import DispyNode, DispyNodeAvailInfo, NodeAllocate, parse_node_specs
from dispynb.protocol.handshake import peer_text
from dispynb.protocol.messages import JobsPlaced, SchedulerNodes
from dispynb.protocol.records import SharedNodeEntry
from dispynb.scheduler import driver
from dispynb.scheduler.driver import NodeLink
from dispynb.secret import split_credential
from dispynb.transport.addressing import format_address

logger = logging.getLogger(__name__)


class SchedulerEngine(NodeEngine):
    """The nodes of a ``dispynb-scheduler`` at ``address`` (``host:port``).

    A `NodeAllocate` for the scheduler's address among the cluster's ``nodes`` gives
    its ``setup_args`` and ``depends``; other ``nodes`` are not used.
    """

    name = "scheduler"
    #: The scheduler chooses the nodes: ``nodes=`` (``%%dispy --on``) selects none,
    #: and only its operator manages them (`SharedJobCluster` manages its own use
    #: of one itself); a job may be pinned to one of them.
    features: frozenset[str] = base.ALL_FEATURES - {
        base.SELECT_NODES,
        base.NODE_MANAGEMENT,
    }

    #: What to do instead of what a scheduler does not do for a client (`base.require`).
    instead = {
        "resetup_node": (
            "through a scheduler, close_node(node) then allocate_node(node) sets the "
            "computation up on the node again (its setup runs anew, with the "
            "setup_args and depends every node behind the scheduler gets)"
        )
    }

    def __init__(
        self,
        address: str,
        exclusive: bool = False,
        allocations: list[NodeAllocate] | None = None,
    ) -> None:
        self.address = address
        self.exclusive = exclusive
        #: The cluster's ``nodes`` (`NodeAllocate`, subclasses too), asked for each
        #: node behind the scheduler (`SchedulerBackend.allot`); none: all used.
        self.allocations = list(allocations or [])

    def open(self, events: JobEvents, config: ClusterConfig) -> SchedulerBackend:
        """Connect to the scheduler as a user and set the computation up there."""
        user, _key = split_credential(config.options.secret)
        if not user:
            raise ConfigurationError(
                "a SharedJobCluster proves its user's credential to the scheduler: "
                "give secret_file= the file 'dispynb-scheduler user add NAME' wrote "
                "(or secret='dispynb-user:NAME:TOKEN', or DISPYNB_SECRET_FILE)"
            )
        # The scheduler is the one "node"; a NodeAllocate naming it keeps its
        # setup_args and depends (`SharedJobCluster` makes one).
        specs = [
            spec
            for spec in parse_node_specs(config.options.nodes)
            if format_address(spec.host, spec.port or 0) == self.address
        ]
        backend = SchedulerBackend(
            events, config, specs=specs or parse_node_specs(self.address)
        )
        backend.driver.config.exclusive = self.exclusive
        backend.allocations = self.allocations
        backend.driver.config.allocates = bool(self.allocations)
        return base.started(backend)

    def __repr__(self) -> str:
        return f"SchedulerEngine({self.address!r}, exclusive={self.exclusive})"


class SchedulerBackend(NodesBackend):
    """`NodesBackend` on one scheduler, showing the façade the nodes behind it.

    The scheduler's own connection is not a node for the façade: its reports
    (`scheduler_nodes`) are, each node as a `NodeInfo` whose ``via`` is the
    scheduler's address (where the journal's `recover_jobs` goes back to).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The nodes behind the scheduler as last reported, and their counts.
        self._behind: dict[str, NodeInfo] = {}
        self._running: dict[str, list[int]] = {}
        self._scheduler = ""
        #: The node behind the scheduler each job went to (`JobsPlaced`), the
        #: bytes of the jobs and files the scheduler sent on to each (dispy's
        #: ``tx``) and of the results each node sent (``rx``), by node id.
        self._placed: dict[int, str] = {}
        self._sent: dict[str, int] = {}
        self._received: dict[str, int] = {}
        #: When a job that ran last ended, and when the last report came
        #: (``time.monotonic``), under `_reported`: `settle_counts` waits for a
        #: report that counts the jobs ended.
        self._ended_at = 0.0
        self._reported_at = 0.0
        self._reported = threading.Condition()
        #: Nodes this cluster closed (``close_node``): leaving the reports, they
        #: are released, not lost; also after an ``allocate_node``, until they
        #: join a report again (set up anew), as the close under way ends.
        self._released_behind: set[str] = set()
        #: Closes asked of the scheduler and not answered yet, by node: a report
        #: it sent before it closed one may still show the node joined.
        self._closes_asked: collections.Counter[str] = collections.Counter()
        #: `SchedulerEngine.allocations`; what they gave each node behind the
        #: scheduler (its CPUs for this cluster), and the nodes they declined.
        self.allocations: list[NodeAllocate] = []
        self._allotted: dict[str, int] = {}
        self._declined: set[str] = set()
        self._allot_said: set[str] = set()  # (each warning of `allot` once)
        self._telling: set[asyncio.Task[None]] = set()
        #: The nodes they declined, until asked again (``allocate_node`` finds
        #: them by any of their names), and those it named since: all their CPUs,
        #: never asked again, as dispy's ``allocate_node`` puts a NodeAllocate of
        #: the node first.
        self.declined_nodes: dict[str, DispyNode] = {}
        self._named: set[str] = set()

    def node_ready(self, link: NodeLink) -> None:
        """The computation is set up at the scheduler; its nodes come in a report."""
        welcome = link.welcome
        self._scheduler = link.node_id
        self._info[link.node_id] = NodeInfo(
            link.node_id,
            link.host,
            link.port,
            welcome.name if welcome else "",
            link.cpus,
            welcome.platform if welcome else "",
        )

    def node_closed(self, link: NodeLink, reason: str) -> None:
        """The scheduler's connection ended: so did every node behind it."""
        self._info.pop(link.node_id, None)
        departure = Departure.RELEASED if self._closed else Departure.LOST
        for info in list(self._behind.values()):
            self._events.node_closed(info, f"scheduler: {reason}", departure)
        self._behind.clear()
        self._running.clear()
        self._placed.clear()

    def node_status(self, link: NodeLink, avail: list[float | None]) -> None:
        """The scheduler's sum over its nodes: each node's comes in the reports."""

    def scheduler_nodes(self, link: NodeLink, report: SchedulerNodes) -> None:
        """The scheduler's report: nodes that joined, left (and why), their counts,
        and the started jobs it requeued (their next start is a Running again)."""
        left, platforms = report.left, report.platforms
        try:
            nodes = [SharedNodeEntry.from_wire(item) for item in report.nodes]
        except MessageError as exc:
            logger.warning("scheduler %s: %s: report ignored", link.node_id, exc)
            return
        events = self._events
        for key in report.requeued:
            if type(key) is int:
                events.job_requeued(key)
        seen = {entry.node_id for entry in nodes}
        self._declined &= seen  # one that left is asked again if it comes back
        for node_id in [n for n in self._allotted if n not in seen]:
            del self._allotted[node_id]
        for node_id in [n for n in self._behind if n not in seen]:
            info = self._behind.pop(node_id)
            self._running.pop(node_id, None)
            why = left.get(node_id)
            if not isinstance(why, str):  # an older scheduler's, or garbage
                why = "it left the scheduler"
            released = node_id in self._released_behind
            events.node_closed(
                info,
                peer_text(why, 500),
                Departure.RELEASED if released else Departure.LOST,
            )
        for entry in nodes:
            if entry.node_id in self._declined:
                continue
            avail = avail_info(entry.avail)
            known = self._behind.get(entry.node_id)
            if known is None and not self._closes_asked[entry.node_id]:
                self._released_behind.discard(entry.node_id)  # set up anew
            allotted = self._allotted.get(entry.node_id)
            platform = platforms.get(entry.node_id)
            if not isinstance(platform, str):  # an older scheduler's, or garbage
                platform = ""
            if allotted is None and self.allocations:
                allotted = self.allot(link, entry, avail, platform)
                if not allotted:
                    continue
            cpus = min(allotted or entry.cpus, entry.cpus)
            info = NodeInfo(
                entry.node_id,
                entry.host,
                entry.port,
                entry.name,
                cpus,
                platform=platform,
                avail=avail,
                via=link.node_id,
                offered=entry.cpus,
            )
            self._behind[entry.node_id] = info
            self._running[entry.node_id] = entry.running
            for key in entry.running:  # placed before this client came back
                self._placed.setdefault(key, entry.node_id)
            if known is None or known.cpus != cpus:
                events.node_ready(info)
            elif _figures(known.avail) != _figures(avail):
                events.node_status(info, avail)
            events.node_counts(info, entry.jobs_done, entry.busy, entry.cpu_time)
        if self._startup is not None and not self._startup.done():
            self._startup.set_result(None)
        with self._reported:
            self._reported_at = time.monotonic()
            self._reported.notify_all()

    def allot(
        self,
        link: NodeLink,
        entry: SharedNodeEntry,
        avail: DispyNodeAvailInfo | None,
        platform: str = "",
    ) -> int:
        """Ask the cluster's `NodeAllocate`s (its ``nodes``, subclasses too) about a
        node behind the scheduler, as dispy asks them about each node it finds: the
        first that returns CPUs gives them, 0 declines it. The scheduler, which
        sends none of this computation's jobs there until told
        (`ComputationSetup.allocates`), gets a limit or closes it there.
        Returns the CPUs this cluster uses there (0: not used)."""
        named = entry.node_id in self._named  # (allocate_node: all of it, unasked)
        cpus, chosen = (entry.cpus, self.allocations[0]) if named else (0, None)
        for asked in () if named else self.allocations:
            try:
                cpus = asked.allocate(
                    self._config.cluster,
                    entry.host,
                    entry.name,
                    entry.cpus,
                    avail_info=avail,
                    platform=platform,
                )
            except Exception as exc:  # the user's code: the node is not used
                logger.warning(
                    "NodeAllocate.allocate raised %r for node %s: not used",
                    exc,
                    entry.node_id,
                )
                cpus, chosen = 0, None
                break
            if cpus and cpus > 0:
                chosen = asked
                break
        cpus = min(int(cpus), entry.cpus) if chosen is not None else 0
        action = "cpus" if cpus > 0 else "close"
        if action not in link.manages:  # an older scheduler: it uses all of them
            self._allot_warning(
                f"the scheduler at {link.node_id} predates per-node NodeAllocate: "
                "every node of it runs this cluster's jobs; upgrade "
                "dispynb-scheduler to this client's version"
            )
            self._allotted[entry.node_id] = entry.cpus
            return entry.cpus
        if (
            chosen is not None
            and self.allocations
            and (
                tuple(chosen.setup_args) != tuple(self.allocations[0].setup_args)
                or list(chosen.depends) != list(self.allocations[0].depends)
            )
        ):
            self._allot_warning(
                f"NodeAllocate for node {entry.node_id} has its own setup_args or "
                "depends: through a scheduler every node is set up with the first "
                "NodeAllocate's (a JobCluster on the nodes takes each node's)"
            )
        if cpus:
            self._allotted[entry.node_id] = cpus
            self.declined_nodes.pop(entry.node_id, None)
        else:
            self._declined.add(entry.node_id)
            self.declined_nodes[entry.node_id] = DispyNode(
                entry.host, entry.name, entry.cpus, port=entry.port, platform=platform
            )
        task = asyncio.get_running_loop().create_task(
            self._tell_allotted(link, entry.node_id, action, cpus)
        )
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)
        return cpus

    async def _tell_allotted(
        self, link: NodeLink, node_id: str, action: str, cpus: int
    ) -> None:
        error, _used = await self.driver.manage_node(link, node_id, action, cpus)
        if error:
            logger.warning("NodeAllocate for node %s: %s", node_id, error)

    def _allot_warning(self, text: str) -> None:
        if text not in self._allot_said:
            self._allot_said.add(text)
            logger.warning("%s", text)

    def prepare(self, job: base.JobRequest) -> None:
        """As a node's; a job pinned to a node (``submit_node``) needs a scheduler
        that honours it: one that predates it would run it anywhere."""
        if job.node_id is not None:
            link = self.driver.nodes.get(self._scheduler)
            if link is not None and link.ready and not link.takes_pins:
                raise NotSupportedError(
                    f"submit_node: the scheduler at {self._scheduler} predates it "
                    "(it would run the job on any node): upgrade dispynb-scheduler "
                    "to this client's version, or use submit"
                )
        super().prepare(job)

    def _destination(self, job: base.JobRequest) -> tuple[str | None, str | None]:
        """Every job goes to the scheduler; a pinned one names its node to it."""
        return None, job.node_id

    def jobs_sent(self, keys: list[int], link: NodeLink) -> None:
        """Jobs sent to the scheduler wait in its queue: as in dispy, they name no
        node until one runs them (the journal notes the scheduler)."""
        self._events.jobs_sent(keys, dataclasses.replace(self._view(link), host=""))

    def jobs_placed(self, link: NodeLink, placed: JobsPlaced) -> None:
        """The scheduler sent jobs to a node behind it: they name that node."""
        if not isinstance(placed.node, str) or not isinstance(placed.keys, list):
            logger.warning("scheduler %s: malformed job placement", link.node_id)
            return
        for key in placed.keys:
            if type(key) is int:
                self._placed[key] = placed.node
                self._count_sent(placed.node, self.driver.job_bytes(key))

    def _count_sent(self, node_id: str, size: int) -> None:
        self._sent[node_id] = self._sent.get(node_id, 0) + size

    def _job_view(self, key: int, link: NodeLink) -> NodeInfo:
        """The node behind the scheduler that runs job ``key``, as dispy's
        SharedJobCluster names it; the scheduler's if unknown."""
        node_id = self._placed.get(key)
        info = self._behind.get(node_id) if node_id is not None else None
        return info if info is not None else self._view(link)

    def job_done(
        self, key: int, link: NodeLink | None, outcome: driver.Outcome
    ) -> None:
        if outcome.start_time:  # it ran on a node: the next report counts it
            with self._reported:
                self._ended_at = time.monotonic()
        node_id = self._placed.get(key)
        if node_id is not None and outcome.size:
            self._received[node_id] = self._received.get(node_id, 0) + outcome.size
        super().job_done(key, link, outcome)
        self._placed.pop(key, None)

    def job_abandoned(
        self, key: int, link: NodeLink | None, reason: str, node_id: str = ""
    ) -> None:
        super().job_abandoned(key, link, reason, node_id)
        self._placed.pop(key, None)

    def job_cancelled(self, key: int) -> None:
        super().job_cancelled(key)
        self._placed.pop(key, None)

    def jobs_cancelled(self, keys: list[int]) -> None:
        super().jobs_cancelled(keys)
        for key in keys:
            self._placed.pop(key, None)

    def job_requeued(self, key: int) -> None:
        self._placed.pop(key, None)  # it goes elsewhere: placed again then
        super().job_requeued(key)

    def traffic(self, node_id: str) -> tuple[int, int]:
        """A node behind the scheduler: the jobs and files the scheduler sent on
        to it for this client, and the results it sent this client, as dispy's
        scheduler counts them for a SharedJobCluster."""
        if node_id in self._behind or node_id in self._received:
            return self._sent.get(node_id, 0), self._received.get(node_id, 0)
        return super().traffic(node_id)

    def settle_counts(self, timeout: float) -> bool:
        """Wait at most ``timeout`` s for the scheduler's report that counts the
        jobs ended so far (it reports every pulse; the results come first): what
        dispy's client counts itself as each result comes. False if none came."""
        with self._reported:
            return self._reported.wait_for(
                lambda: self._reported_at >= self._ended_at, timeout
            )

    def running_jobs(self, node_id: str) -> list[int]:
        """This cluster's jobs at a node behind the scheduler: those placed there
        that started, or that its last report lists."""
        return list(self._on_loop(self._running_behind, node_id))

    def _running_behind(self, node_id: str) -> list[int]:
        reported = set(self._running.get(node_id, ()))
        started = self._started
        return [
            key
            for key, placed in self._placed.items()
            if placed == node_id and (key in started or key in reported)
        ]

    def manage_node(
        self,
        node_id: str,
        action: str,
        what: str,
        cpus: int = 0,
        terminate: bool = False,
    ) -> tuple[str, int]:
        """Have the scheduler apply ``action`` (a `NodeManage` one, with its
        ``cpus`` and ``terminate``) to the node ``node_id`` behind it, for this
        computation alone: '' once done, else why not; and the CPUs it answered
        (of ``"cpus"``). ``what``: the user's method, named in the
        `NotSupportedError` raised if the scheduler predates it."""
        error, used = self._runner.run_sync(
            self._manage, node_id, action, what, cpus, terminate
        )
        return str(error), int(used)

    async def _manage(
        self, node_id: str, action: str, what: str, cpus: int, terminate: bool
    ) -> tuple[str, int]:
        link = self.driver.nodes.get(self._scheduler)
        if link is None or link.conn is None or not link.ready:
            return f"the scheduler {self._scheduler} is not connected", -1
        if action not in link.manages:
            raise NotSupportedError(
                f"{what}: the scheduler at {self._scheduler} predates it: upgrade "
                "dispynb-scheduler to this client's version"
            )
        if action == "close":  # it leaves the reports: released, not lost
            self._released_behind.add(node_id)
            self._closes_asked[node_id] += 1
        elif action == "allocate":
            # (still released as a close under way ends: it joins again after)
            self._named.add(node_id)
            self._declined.discard(node_id)
        try:
            error, used = await self.driver.manage_node(
                link, node_id, action, cpus, terminate
            )
        finally:
            if action == "close":
                self._closes_asked -= collections.Counter([node_id])
        if error and action == "close":
            self._released_behind.discard(node_id)
        return error, used

    def send_file(self, node_id: str, ref: FileRef) -> str:
        """Through the scheduler, which places the file on each node it set the
        computation up on (dispy's ``relay``)."""
        if node_id in self._behind:
            node_id = self._scheduler
        error = super().send_file(node_id, ref)
        if not error:  # placed on each of the computation's nodes
            self._on_loop(self._count_file, ref.size)
        return error

    def _count_file(self, size: int) -> None:
        for node_id in self._behind:
            self._count_sent(node_id, size)


def _figures(avail: DispyNodeAvailInfo | None) -> tuple[float, ...] | None:
    """What a node's `DispyNodeAvailInfo` says, to compare two reports by (it has
    no ``__eq__``: dispy's has none, and users may key dicts on it); None: unknown."""
    if avail is None:
        return None
    return (avail.cpu, avail.memory, avail.disk, avail.swap)


__all__ = ["SchedulerBackend", "SchedulerEngine"]
