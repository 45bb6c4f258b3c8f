"""`SharedComputation`'s node side: its jobs go to the nodes, their ends come back.

The scheduler sends a computation's jobs (and their own files: `_JobFiles`) to its
nodes, checks that what a node sends back is about the jobs it runs
(`schedserver.nodeclaims`), passes results on to the client, frees their slots and,
when a node leaves or shuts down, runs its jobs elsewhere or ends them; it tells the
client the nodes it runs on (`SchedulerNodes`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import TYPE_CHECKING, Any, cast

from dispynb.errors import DispynbError, FramingError
from dispynb.protocol.framing import Frame, split_body
from dispynb.protocol.messages import (
    ABANDONED,
    CANCELLED,
    RETURNED,
    ComputationSetup,
    FilePlaced,
    JobProvisional,
    JobResults,
    JobsPlaced,
    JobSubmit,
    Message,
    ResultChunk,
    SchedulerNodes,
    pack_header,
)
from dispynb.protocol.records import ResultEntry, SharedNodeEntry, is_start
from dispynb.scheduler.policy import update_mean
from schedserver.fairshare import Account
from schedserver.jobfiles import _JobFiles, job_size, own_files
from schedserver.nodeclaims import all_own, only_own

if TYPE_CHECKING:
    from schedserver.computation import QueuedJob, SharedComputation, Upstream
    from schedserver.jobqueue import JobQueue
    from schedserver.session import SchedulerSession

#: The computation's logger (its log lines keep the name they had in it).
logger = logging.getLogger("schedserver.computation")

#: How a results message's header ends, and a job handed back in one.
_RESULTS_OP = pack_header({"op": JobResults.op})[1:]
_RETURNED = pack_header({"": RETURNED})[2:]


class _NodeSide(_JobFiles):
    """`SharedComputation`'s part that deals with its nodes: jobs sent, results and
    node reports passed on, nodes lost."""

    session: SchedulerSession | None
    setup: ComputationSetup
    comp_id: int
    client_comp_id: int
    account: Account
    queue: JobQueue
    running: dict[int, QueuedJob]
    upstream: dict[str, Upstream]
    foreign_senders: set[str]
    nodes_closed: set[str]
    awaiting_client: set[str]
    ready_sent: bool
    closing: bool
    failures: list[str]
    recovering: bool
    replaying: bool
    client_limit: int | None
    placements: dict[int, list[Any]]  # request -> [nodes yet to answer, error]
    node_done: dict[str, list[float]]
    _reported: list[list[Any]] | None
    _left: dict[str, str]
    _requeued: list[int]
    _as_sent: tuple[Frame, QueuedJob, QueuedJob, int] | None

    @property
    def _whole(self) -> SharedComputation:
        """The computation this is a part of, as the server takes it."""
        return cast("SharedComputation", self)

    @property
    def name(self) -> str:
        raise NotImplementedError  # `SharedComputation.name`

    @property
    def held(self) -> bool:
        raise NotImplementedError  # `SharedComputation.held`

    def hold(self, job: QueuedJob) -> None:
        raise NotImplementedError  # `SharedComputation.hold`

    def let_go(self, job: QueuedJob) -> None:
        raise NotImplementedError  # `SharedComputation.let_go`

    def to_client(
        self,
        message: Message,
        buffers: list[memoryview] | None = None,
        gather: bool = False,
        frame: Frame | None = None,
        sent: bool = False,
        size: int | None = None,
        job: tuple[int, int] | None = None,
    ) -> None:
        raise NotImplementedError  # `SharedComputation.to_client`

    def end_jobs(self, entries: list[ResultEntry]) -> None:
        raise NotImplementedError  # `SharedComputation.end_jobs`

    def _say_what_waits(self) -> None:
        raise NotImplementedError  # `SharedComputation._say_what_waits`

    def _unpin(self, job: QueuedJob) -> None:
        raise NotImplementedError  # `SharedComputation._unpin`

    def finish_if_done(self) -> None:
        raise NotImplementedError  # `SharedComputation.finish_if_done`

    def runs_on(self, upstream: Upstream, key: int, attempt: int) -> bool:
        """Whether that attempt of job ``key`` runs on ``upstream``'s node."""
        job = self.running.get(key)
        return (
            job is not None
            and job.attempt == attempt
            and job.node == upstream.node.name
        )

    def foreign(self, upstream: Upstream, count: int) -> None:
        """``upstream``'s node sent ``count`` messages (or parts) about jobs it does
        not run: dropped (`schedserver.nodeclaims`); said once per node."""
        name = upstream.node.name
        if name not in self.foreign_senders:
            self.foreign_senders.add(name)
            logger.warning(
                "%s: node %s sent results or files for jobs it does not run (%d so "
                "far): dropped, and said once",
                self.name,
                name,
                count,
            )

    def from_node(
        self,
        upstream: Upstream,
        message: ResultChunk | JobProvisional,
        buffers: list[memoryview],
    ) -> None:
        """A chunk of a large result, or a provisional result, for the client, if
        its job runs on ``upstream``'s node."""
        if self.runs_on(upstream, message.key, message.attempt):
            self.to_client(message, buffers)
        else:
            self.foreign(upstream, 1)

    def pass_on(self, upstream: Upstream, frame: Frame, waiting: int) -> None:
        """A node's message before it is decoded (`Connection.dispatch`'s early
        handler): results that the client gets unchanged go to it now, and are
        decoded for the bookkeeping after (`on_results`): the client waits for
        them, not for that (W2). Not results read with others (they are gathered),
        nor a job handed back (it runs elsewhere)."""
        session = self.session
        if (
            waiting
            or session is None
            or session.ending  # told why it ends: it is sent nothing more
            or session.gathering
            or session.backlog is not None
            or self.replaying
            or self.client_limit is not None
            or self.client_comp_id != self.comp_id
        ):
            return
        try:
            # (the lengths checked too: a frame the client could not cut must
            # not go to it)
            header = bytes(split_body(frame[2], frame[1])[0][0])
        except FramingError:
            return  # decoding it says what is wrong
        # `Message.to_header` puts the op last: the last pair names the message
        # (the last of two equal keys wins).
        if not header.endswith(_RESULTS_OP) or _RETURNED in header:
            return
        if upstream.node.name in self.nodes_closed:
            return  # the jobs it cancels unstarted may be handed back (on_results)
        if not all_own(header, functools.partial(self.runs_on, upstream)):
            return  # what is not its node's is taken out first (on_results)
        upstream.passed = True
        try:
            session.conn.relay(frame)
        except DispynbError:
            return  # a connection that ended is handled by its session

    def on_results(
        self, upstream: Upstream, message: JobResults, buffers: list[memoryview]
    ) -> None:
        """Jobs ended on a node: pass the results on, free their slots."""
        message, buffers, foreign = only_own(
            message, buffers, functools.partial(self.runs_on, upstream)
        )
        if foreign:
            self.foreign(upstream, foreign)
        # More of the node's messages were read with this one (a burst of short
        # jobs): its results are gathered into one message to the client, and the
        # slots they free go out together, once the last of them is handled.
        passed, upstream.passed = upstream.passed, False
        conn = upstream.conn
        more = conn is not None and conn.messages_waiting > 0
        size = None if conn is None or foreign else conn.last_size
        # The client waits for them (W2): forwarded first, before the bookkeeping,
        # unless a job came back unrun (it runs elsewhere: not for the client); a
        # message not gathered goes as the node sent it (not encoded again).
        forward = bool(message.results or message.started)
        # close_node: the jobs it held that had not started come back cancelled
        closed_here = upstream.node.name in self.nodes_closed
        if forward:
            for item in message.results:
                outcome = item[2:3] if isinstance(item, list) else None
                if outcome == [RETURNED] or (closed_here and outcome == [CANCELLED]):
                    break  # it goes after the bookkeeping, without that job
            else:
                frame = None if more or conn is None or foreign else conn.last_frame
                self.to_client(
                    message, buffers, gather=more, frame=frame, sent=passed, size=size
                )
                forward = False
        returned: list[int] = []
        stranded: list[ResultEntry] = []  # pinned jobs handed back: run nowhere
        for start in message.started:  # [key, attempt, start_time, before]
            if not is_start(start):
                continue  # a node's garbage (the schema checks only for a list)
            job = self.running.get(start[0])
            if job is not None and job.attempt == start[1]:
                job.started = True
                job.start_time = float(start[2])
        node = upstream.node
        done = self.node_done.setdefault(node.name, [0, 0.0])
        ended_files: list[str] = []  # the own files of the jobs that ended here
        for index, item in enumerate(message.results):
            entry, _streamed = ResultEntry.from_wire(item)
            job = self.running.get(entry.key)
            if job is None or job.attempt != entry.attempt:
                continue
            del self.running[entry.key]
            self.let_go(job)
            self.server.job_left(self._whole, node)
            ended_files.extend(own_files(job.item))
            run_time = entry.end_time - entry.start_time
            if entry.start_time > 0.0:
                node.mean = update_mean(node.mean, run_time)
            handed_back = closed_here and entry.outcome == CANCELLED
            if handed_back and not (job.pin or job.cancelled or self.closing):
                returned.append(index)  # as a JobCluster's: it runs elsewhere
                job.node = ""
                job.started = False
                self.queue.appendleft(job)
                self.hold(job)
                self.account.queued += 1
            elif entry.outcome == RETURNED and not self.closing:
                if not node.leaving:  # it would hand back each job sent to it
                    node.leaving = True
                    logger.info("node %s shuts down: no more jobs for it", node.name)
                returned.append(index)
                if job.pin:  # it may run nowhere else (as a JobCluster's)
                    stranded.append(_stranded(job, f"node {node.name} shuts down,"))
                    continue
                job.node = ""  # the node shuts down: it runs elsewhere
                job.started = False
                self.queue.appendleft(job)
                self.hold(job)
                self.account.queued += 1
            else:
                done[0] += 1
                done[1] += max(run_time, 0.0) if entry.start_time > 0.0 else 0.0
        if ended_files:
            self._job_files_ended(upstream, ended_files)
        if returned:
            results = [r for i, r in enumerate(message.results) if i not in returned]
            message = dataclasses.replace(message, results=results)
        if forward and (message.results or message.started):
            self.to_client(message, buffers, gather=more, size=size)  # fewer results
        self.end_jobs(stranded)
        session = self.session
        if more:
            if session is not None:
                session.send_gathered_soon()
        elif session is not None:
            session.send_gathered()
        if self.session is None and not self.running and (not self.queue or self.held):
            if not self.closing:  # closing: nothing waits, nothing is kept for it
                self._say_what_waits()
            self.server.leave_the_nodes(self._whole)
        if self.recovering:
            self.finish_if_done()
        if more:
            self.server.schedule_soon()
        else:
            self.server.schedule()

    def report_nodes(self, force: bool = False) -> None:
        """Tell the client the nodes it runs on and its counts there, if they
        changed since the last report (``force``: in any case)."""
        if self.session is None or not self.ready_sent or self.closing:
            return
        running: dict[str, list[QueuedJob]] = {}
        for job in self.running.values():
            running.setdefault(job.node, []).append(job)
        nodes = []
        platforms = {}
        for name, upstream in sorted(self.upstream.items()):
            node = upstream.node
            if (
                not upstream.ready
                or upstream.conn is None
                or not node.alive
                or upstream.closing
            ):
                continue
            if node.platform:
                platforms[name] = node.platform
            done = self.node_done.get(name, [0, 0.0])
            jobs = running.get(name, [])
            nodes.append(
                SharedNodeEntry(
                    name,
                    node.hostname,
                    node.host,
                    node.port,
                    node.cpus,
                    int(done[0]),
                    round(done[1], 6),
                    sorted(job.key for job in jobs),
                    sum(1 for job in jobs if job.started),
                    list(node.avail),
                ).to_wire()
            )
        # Requeued keys come only with a node's departure (`node_lost`), in _left.
        if force or nodes != self._reported or self._left:
            self._reported = nodes
            left, self._left = self._left, {}
            requeued, self._requeued = self._requeued, []
            self.to_client(
                SchedulerNodes(
                    comp_id=self.comp_id,
                    nodes=nodes,
                    left=left,
                    requeued=requeued,
                    platforms=platforms,
                )
            )

    def placed(self, upstream: Upstream, message: FilePlaced) -> None:
        """``upstream``'s node answered a ``send_file``: the client hears once
        every node it was sent to has (or was lost)."""
        self._placed_on(upstream.node.name, message.request, message.error)

    def _placed_on(self, node: str, request: int, error: str) -> None:
        waiting = self.placements.get(request)
        if waiting is None or node not in waiting[0]:
            return
        waiting[0].discard(node)
        if error and not waiting[1]:
            waiting[1] = error
        if not waiting[0]:
            del self.placements[request]
            self.to_client(
                FilePlaced(comp_id=self.comp_id, request=request, error=waiting[1])
            )

    def node_lost(self, upstream: Upstream, reason: str) -> None:
        """A node's connection ended: its jobs run again elsewhere (reentrant) or
        end ``Abandoned``, as a `JobCluster`'s do when it loses a node."""
        upstream.conn = None
        upstream.ready = False
        upstream.ended = True
        # A send_file it had not answered: its client waited its whole timeout
        # for it. Not an error: the file is on every node the computation has.
        for request in list(self.placements):
            self._placed_on(upstream.node.name, request, "")
        self.account.nodes.discard(upstream.node.name)
        # Its client forgets it took the node out or limited it (the node left):
        # all of it in use when it is set up again, for both. Not a node it
        # closed and allocated again since: the limits it set after are its word.
        if not upstream.closing or upstream.node.name in self.nodes_closed:
            self.account.limits.pop(upstream.node.name, None)
        self.awaiting_client.discard(upstream.node.name)
        stopping = upstream.node.stopping
        # Closed by its client on this link (close_node), also when allocate_node
        # followed before the close was over (the node is no longer in
        # nodes_closed, and is set up again): not "lost (closed)".
        closed = upstream.closing or upstream.node.name in self.nodes_closed
        self._left[upstream.node.name] = (
            "its client closed it (close_node)"
            if closed
            else f"it stopped: {stopping}"
            if stopping
            else f"it was lost ({reason})"
        )
        name = upstream.node.name
        lost = [job for job in self.running.values() if job.node == name]
        ended: list[ResultEntry] = []
        node = upstream.node
        why = (
            f"its client closed node {name} (close_node, terminate_pending)"
            if closed
            else f"node {name} stopped: {node.stopping},"
            if node.stopping
            else f"node {name} was lost ({reason})"
        )
        for job in lost:
            del self.running[job.key]
            self.let_go(job)
            self.server.job_left(self._whole, upstream.node)
            if job.pin:  # it may run nowhere else (as a JobCluster's)
                ended.append(_stranded(job, why))
            elif self.setup.reentrant and not self.closing:
                if job.started:  # the client heard it Running: it hears it again
                    self._requeued.append(job.key)
                job.node = ""
                job.started = False
                self.queue.appendleft(job)
                self.hold(job)
                self.account.queued += 1
            else:
                ended.append(
                    ResultEntry.unrun(
                        job.key,
                        job.attempt,
                        ABANDONED,
                        f"{why} and the computation is not reentrant",
                    )
                )
        again = (  # allocated again as its close went on: set up anew next
            upstream.closing
            and name not in self.nodes_closed
            and node.alive
            and not node.leaving
            and not self.closing
        )
        if self.account.pinned.get(name) and not again:  # queued for it alone
            if closed:  # (those it ran were terminated; these never started)
                why = f"its client closed node {name} (close_node)"
            for job in [job for job in self.queue if job.pin == name]:
                self.queue.remove(job)
                self.let_go(job)
                self.account.queued -= 1
                self._unpin(job)
                ended.append(_stranded(job, why))
        self.end_jobs(ended)
        if lost and self.closing:
            # Closed by its client or by this scheduler (a zombie, its results'
            # keep time over): its node is not lost, its jobs ended with it.
            logger.info(
                "%s: closed on node %s, %d of its jobs ended with it",
                self.name,
                upstream.node.name,
                len(lost),
            )
        elif lost:
            # A stopping node's reentrant jobs run elsewhere: nothing is lost.
            moved = stopping and self.setup.reentrant
            (logger.info if moved else logger.warning)(
                "%s: node %s %s with %d of its jobs (%s)",
                self.name,
                upstream.node.name,
                "stopped" if stopping else "lost",
                len(lost),
                "queued again" if self.setup.reentrant else "ended",
            )
        if self.closing:
            upstream.closed = True
            self.server.check_closed(self._whole)
        elif not self.ready_sent and not upstream.closed:
            self.failures.append(f"{upstream.node.name}: {reason}")
        else:
            self.report_nodes()

    def send_jobs(self, upstream: Upstream, jobs: list[QueuedJob]) -> None:
        """Send ``jobs`` to ``upstream``'s node, as one message, or as several
        within what the node takes (a job over it ends saying so)."""
        name = upstream.node.name
        limit = upstream.node.max_message_size
        parts = [jobs] if _fit_unseen(jobs, limit) else self._cut(upstream, jobs)
        if len(parts) != 1:
            jobs = [job for part in parts for job in part]
            if not jobs:
                return
        running = self.running
        for job in jobs:
            job.node = name
            running[job.key] = job
        as_sent = self._as_sent
        # The client hears where they go before any of their results can come
        # (one connection, in order): dispy's jobs name their node.
        self.to_client(
            JobsPlaced(
                comp_id=self.comp_id,
                node=name,
                keys=[job.key for job in jobs],
                attempts=[job.attempt for job in jobs],
            )
        )
        try:
            self._send_job_files(upstream, jobs)
            if (
                as_sent is not None
                and len(parts) == 1
                and len(jobs) == as_sent[3]
                and jobs[0] is as_sent[1]
                and jobs[-1] is as_sent[2]
                and upstream.conn is not None
            ):
                # Exactly the client's message (the queue was empty, and jobs leave
                # it in order): passed on as it came, not encoded again.
                self._as_sent = None
                upstream.conn.relay(as_sent[0])
            else:
                for part in parts:
                    self._submit(upstream, part)
        except DispynbError as exc:
            logger.debug("%s: cannot send jobs: %s", self.name, exc)

    def _submit(self, upstream: Upstream, jobs: list[QueuedJob]) -> None:
        """Write ``jobs`` to ``upstream``'s node in one `JobSubmit`."""
        items: list[list[Any]] = []
        limits: list[list[Any]] = []
        buffers: list[memoryview] = []
        for job in jobs:
            items.append(job.item)
            buffers.extend(job.buffers)
            if job.limits is not None:
                limits.append(job.limits)
        self.server.write(
            upstream,
            JobSubmit(comp_id=self.comp_id, jobs=items, limits=limits),
            buffers,
        )

    def _cut(self, upstream: Upstream, jobs: list[QueuedJob]) -> list[list[QueuedJob]]:
        """``jobs`` in parts that each make a message ``upstream``'s node takes
        (its --max-message-size: one over it would end the connection, losing
        every job there). A job over it alone ends here, saying so."""
        node = upstream.node
        room = node.max_message_size - _SUBMIT_ROOM
        parts: list[list[QueuedJob]] = [[]]
        size = 0
        over: list[ResultEntry] = []
        for job in jobs:
            one = _job_bytes(job)
            if one > room:
                self.let_go(job)
                self.server.job_left(self._whole, node)
                over.append(_over_node(job, one, node.name, node.max_message_size))
                continue
            if size + one > room and parts[-1]:
                parts.append([])
                size = 0
            parts[-1].append(job)
            size += one
        if over:
            logger.warning(
                "%s: %d jobs not sent to node %s: their arguments are over the "
                "%d bytes it takes (dispynb-node --max-message-size)",
                self.name,
                len(over),
                node.name,
                node.max_message_size,
            )
            self.end_jobs(over)
        return [part for part in parts if part]


#: Bytes of a `JobSubmit` besides its jobs (its header's fields, the MAC),
#: counted when jobs are cut to a node's --max-message-size.
_SUBMIT_ROOM = 64 * 1024


def _job_bytes(job: QueuedJob) -> int:
    """What ``job`` adds to a `JobSubmit` at most: its buffers and their lengths,
    its entry (`job_size` counts more than its bytes) and its limits."""
    return (
        sum(b.nbytes for b in job.buffers)
        + 4 * len(job.buffers)
        + job_size(job.item)
        + (256 if job.limits is not None else 0)
    )


def _fit_unseen(jobs: list[QueuedJob], limit: int) -> bool:
    """Whether ``jobs`` surely fit one message a node taking ``limit`` bytes
    takes, looking only at the client messages they came in (each counted whole:
    `JobBatch.size`, more than their jobs' bytes), not job by job."""
    if not limit:
        return True  # (not said: a node that predates it)
    total = 0
    seen: set[int] = set()
    for job in jobs:
        batch = job.batch
        if batch is None:
            return False
        if id(batch) not in seen:
            seen.add(id(batch))
            total += batch.size
    return total + _SUBMIT_ROOM <= limit


def _over_node(job: QueuedJob, size: int, node: str, limit: int) -> ResultEntry:
    """The end of ``job``, whose ``size`` bytes are over the ``limit`` of the
    node it was to run on."""
    return ResultEntry.unrun(
        job.key,
        job.attempt,
        CANCELLED,
        f"not run: its arguments take {size} bytes in a message, over the {limit} "
        f"bytes node {node} takes (dispynb-node --max-message-size): send large "
        "data as a file (depends, or the job's own files), or have the nodes' "
        "limit raised",
    )


def _stranded(job: QueuedJob, why: str) -> ResultEntry:
    """The end of ``job``, pinned to a node (``submit_node``) that cannot run it
    (``why``): ``Abandoned``, since no other node may, reentrant or not."""
    return ResultEntry.unrun(
        job.key,
        job.attempt,
        ABANDONED,
        f"{why} and the job was pinned to it (submit_node)",
    )
