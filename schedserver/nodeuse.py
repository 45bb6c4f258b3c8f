"""`SharedComputation`'s use of its nodes as its client manages it.

A client may deallocate, allocate again, limit the CPUs of, or close one of its
computation's nodes (dispy's ``deallocate_node``, ``allocate_node``,
``set_node_cpus``, ``close_node``: `NodeManage`), for that computation alone; with
``allocate`` in its setup, none of its jobs go to a node until its client's
``allocate()`` answered for it. Such changes come in quick turns: a close or a setup
again under way decides what the next one does (`_NodeUse._turning`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

from dispynb.protocol.handshake import peer_text
from dispynb.protocol.messages import (
    CANCELLED,
    ComputationClose,
    ComputationSetup,
    NodeManage,
)
from dispynb.protocol.records import ResultEntry
from dispynb.wording import counted
from schedserver.fairshare import Account

if TYPE_CHECKING:
    from schedserver.computation import QueuedJob, SharedComputation, Upstream
    from schedserver.jobqueue import JobQueue
    from schedserver.server import SchedulerServer
    from schedserver.session import SchedulerSession

#: The computation's logger (its log lines keep the name they had in it).
logger = logging.getLogger("schedserver.computation")

#: Changes of its nodes' use a computation's client makes (`_NodeUse.manage`)
#: logged at info level; the rest at debug: a client may make them at will.
LOGGED_CHANGES = 16

#: The `NodeManage` actions the scheduler takes (`_NodeUse.manage`).
NODE_ACTIONS = ("allocate", "deallocate", "cpus", "close")


class _NodeUse:
    """`SharedComputation`'s part that its client's node management changes: which
    of its nodes it uses, with how many CPUs, and which it is closed on."""

    # Set by `SharedComputation.__init__` (see there).
    server: SchedulerServer
    session: SchedulerSession | None
    setup: ComputationSetup
    comp_id: int
    account: Account
    queue: JobQueue
    upstream: dict[str, Upstream]
    nodes_closed: set[str]
    nodes_declined: set[str]
    nodes_named: set[str]
    awaiting_client: set[str]
    recovering: bool
    _changes_logged: int

    @property
    def name(self) -> str:
        raise NotImplementedError  # `SharedComputation.name`

    def let_go(self, job: QueuedJob) -> None:
        raise NotImplementedError  # `SharedComputation.let_go`

    def _unpin(self, job: QueuedJob) -> None:
        raise NotImplementedError  # `SharedComputation._unpin`

    def end_jobs(self, entries: list[ResultEntry]) -> None:
        raise NotImplementedError  # `SharedComputation.end_jobs`

    def serves(self, node: str) -> bool:
        """Whether the computation is set up on ``node`` and the node takes jobs:
        a job pinned to it may wait for it there."""
        upstream = self.upstream.get(node)
        return (
            upstream is not None
            and upstream.ready
            and upstream.conn is not None
            and upstream.node.alive
            and not upstream.node.leaving
        )

    def set_up_again(self, node: str) -> bool:
        """Whether ``node`` is being set up again for it (its client allocated it
        as, or after, its close went on): jobs pinned to it wait for that."""
        return node not in self.nodes_closed and self._turning(node) is not None

    def manage(self, message: NodeManage) -> tuple[str, int]:
        """Its client's ``deallocate_node``, ``allocate_node``, ``set_node_cpus`` or
        ``close_node`` of one of its nodes (``message``), for this computation
        alone, never another's use of the node: '' once done, else why not (for
        the client); and the CPUs of the node it may use now."""
        node, action = message.node, message.action
        if action == "close" and node in self.awaiting_client:
            self.nodes_declined.add(node)  # its allocate() declined the node
        self.awaiting_client.discard(node)  # its client answered for it
        if action not in NODE_ACTIONS:
            return f"the scheduler knows no node action {peer_text(action, 50)}", 0
        limits = self.account.limits
        if action == "allocate":
            limits.pop(node, None)  # (also of a node gone since)
            if node in self.nodes_closed:  # closed, now named again
                self.nodes_closed.discard(node)
                self.nodes_declined.discard(node)
                self.nodes_named.add(node)  # (its client uses it all, unasked)
                self._log_change("allocated node %s again", node)
                self.server.set_up_again(cast("SharedComputation", self), node)
                return "", 0
            if self._turning(node) is not None:  # set up (again) once closed
                return "", 0
        elif action == "close":
            turning = self._turning(node)
            if turning is not None:
                # The last call decides: a close under way goes on (not to be
                # followed by a setup again), a setup under way is closed; with
                # terminate, the node (closing already) ends the jobs it let run.
                send = message.terminate or not turning.closing
                self._close_on(turning, message.terminate, send=send)
                self._log_change("closed node %s", node)
                return "", 0
        turning = self._turning(node) if action in ("deallocate", "cpus") else None
        if turning is None or node in self.nodes_closed:
            why = self._unmanaged(node)
            if why:
                return why, 0
        # (else allocated again, its close or setup under way: a limit it keeps)
        upstream = self.upstream[node]
        cpus = upstream.node.cpus
        if action == "cpus":
            asked = message.cpus
            if asked < 0 and cpus + asked < 0:  # dispy leaves it so
                return "", limits.get(node, cpus)
            used = max(0, min(cpus, asked if asked >= 0 else cpus + asked))
            if used < cpus:
                limits[node] = used  # (0: deallocated)
            else:
                limits.pop(node, None)
            self._log_change("limited node %s to %s", node, counted(used, "CPU"))
            return "", used
        if action == "deallocate":
            limits[node] = 0
        elif action == "close":
            self._close_on(upstream, message.terminate)
        self._log_change("%sd node %s", action, node)
        return "", 0 if action != "allocate" else cpus

    def _log_change(self, text: str, *args: Any) -> None:
        """Log its client's change of a node's use (``text`` % ``args``): at info
        level up to `LOGGED_CHANGES`, then at debug (said once), so that no client
        grows the scheduler's log at will."""
        self._changes_logged += 1
        level = (
            logging.INFO if self._changes_logged <= LOGGED_CHANGES else logging.DEBUG
        )
        logger.log(level, "%s: its client " + text, self.name, *args)
        if self._changes_logged == LOGGED_CHANGES:
            logger.info(
                "%s: its client's further changes of its nodes' use are logged at "
                "debug level (--loglevel debug)",
                self.name,
            )

    def node_back(self, node: str) -> bool:
        """Whether to set it up again on ``node``, up again: not if its client
        closed it there (``close_node``), but one its allocate() declined is asked
        again (as dispy asks each node it finds)."""
        if node in self.nodes_declined:
            self.nodes_declined.discard(node)
            self.nodes_closed.discard(node)
        return node not in self.nodes_closed

    def hold_for_client(self, node: str) -> None:
        """Set up on ``node``: none of its jobs go there until its client's
        allocate() answers (`ComputationSetup.allocates`), if a client that asks
        it is there; a recovering one or none cannot (nodes it declined are closed
        for it: `nodes_closed`)."""
        if (
            self.setup.allocates
            and self.session is not None
            and not self.recovering
            and node not in self.nodes_named
        ):
            self.account.limits[node] = 0
            self.awaiting_client.add(node)

    def _lift_holds(self) -> None:
        for node in self.awaiting_client:
            self.account.limits.pop(node, None)
        if self.awaiting_client:
            self.awaiting_client.clear()
            self.server.schedule_soon()

    def _unmanaged(self, node: str) -> str:
        """Why its client cannot manage its use of ``node`` now ('' if it can)."""
        upstream = self.upstream.get(node)
        shown = peer_text(node, 200)
        if node in self.nodes_closed:
            return (
                f"node {shown} is closed for this computation (close_node): "
                "allocate_node gives it back"
            )
        if upstream is not None and upstream.node.alive and upstream.node.leaving:
            return f"node {shown} shuts down: it takes no more jobs"
        if not self.serves(node):
            return (
                f"node {shown} does not run this computation now (it left, or never "
                "was one of its nodes)"
            )
        return ""

    def _turning(self, node: str) -> Upstream | None:
        """Its link to ``node`` if a close or a setup (again) is under way there
        (``close_node`` and ``allocate_node`` in quick turns): None if the node is
        in use, left, or shuts down."""
        upstream = self.upstream.get(node)
        if (
            upstream is None
            or upstream.ended
            or upstream.task is None
            or upstream.task.done()
            or not upstream.node.alive
            or upstream.node.leaving
            or (upstream.ready and not upstream.closing)
        ):
            return None
        return upstream

    def _close_on(self, upstream: Upstream, terminate: bool, send: bool = True) -> None:
        """Its client's ``close_node``: close it on ``upstream``'s node (its cleanup
        runs there), not to be set up there again until ``allocate_node``. Its
        jobs running there finish (or are terminated); those pinned there that have
        not started are cancelled, the others it held there run elsewhere
        (`on_results`), as a `JobCluster`'s."""
        name = upstream.node.name
        upstream.closing = True
        self.nodes_closed.add(name)
        # None of its jobs go there meanwhile, even if its client allocates it
        # again before the close ends (that lifts the limit): it is set up anew.
        self.account.nodes.discard(name)
        self.account.limits[name] = 0
        if self.account.pinned.get(name):
            cancelled = []
            for job in [job for job in self.queue if job.pin == name]:
                self.queue.remove(job)
                self.let_go(job)
                self.account.queued -= 1
                self._unpin(job)
                cancelled.append(
                    ResultEntry.unrun(
                        job.key,
                        job.attempt,
                        CANCELLED,
                        f"its node {name} was closed (close_node)",
                    )
                )
            self.end_jobs(cancelled)
        if send:  # (not if sent already, unless to terminate)
            self.server.write(
                upstream,
                ComputationClose(
                    comp_id=self.comp_id, terminate=terminate, cancel_waiting=True
                ),
            )
