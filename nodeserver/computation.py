"""`Computation`: one client's computation on this node, its process and its workers.

The node server never runs user code. Each computation gets its own process
(`nodeserver.compute`, started by a `nodeserver.launcher.Launcher`) that
loads the function, runs ``setup`` and forks pre-started workers; jobs go to workers
over their own sockets and results come back the same way. A worker that dies is
reported by the computation process (with its exit status) and replaced; its running
job is reported as crashed, with the reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import operator
from collections.abc import Callable, Mapping
from typing import Any

from dispynb.errors import DispynbError
from dispynb.protocol.messages import CRASHED, Message
from nodeserver.budget import CpuBudget
from nodeserver.compstate import JobLimits as JobLimits
from nodeserver.compstate import (
    KeepableFile,
    KeepFile,
    Report,
    ReportFile,
    ReportProvisional,
    Worker,
    _ComputationState,
)
from nodeserver.compstate import NodeJob as NodeJob
from nodeserver.control import ControlChannel
from nodeserver.filestore import FileStore
from nodeserver.ipc import Run
from nodeserver.jobfiles import _JobFiles
from nodeserver.jobreasons import crash_reason as crash_reason
from nodeserver.jobreasons import mem_limit_note as mem_limit_note
from nodeserver.jobreasons import timeout_reason as timeout_reason
from nodeserver.jobstops import _JobStops
from nodeserver.launcher import PROCESS_LAUNCHER, ComputationProcess, Launcher
from nodeserver.leftovers import Removals
from nodeserver.resultobjects import ResultObjects
from nodeserver.sharedbody import segments
from nodeserver.stealing import _WorkStealing
from nodeserver.workerlife import _WorkerLife
from nodeserver.workerreports import SKIP_GRACE as SKIP_GRACE
from nodeserver.workerreports import _WorkerReports

logger = logging.getLogger(__name__)

#: Mean job time (s) under which a worker is sent its next job before it finishes the
#: current one, hiding the node-to-worker round trip.
PREFETCH_BELOW = 0.01

#: Seconds of short jobs a worker may hold queued behind the one it runs: one job
#: when they take a millisecond or more, up to `MAX_AHEAD` when they take a few
#: microseconds, so that the worker finds its next jobs already in its socket and the
#: node hands them over a few at a time (one write, one wake-up of the worker). Small:
#: a job waiting in a busy worker cannot go to an idle one.
AHEAD_SECONDS = 0.001

#: Most jobs sent ahead to one worker.
MAX_AHEAD = 8

#: Only jobs with arguments under this size go ahead beyond the first: a worker's
#: socket and memory should not fill with large arguments waiting for their turn.
AHEAD_BYTES = 64 * 1024

#: A result this large (its pickled buffers) is streamed to the client in chunks
#: (`nodeserver.outbox`); the computation keeps its buffers' kinds for that.
STREAM_BYTES = 64 * 1024 * 1024

#: A worker's jobs (sent, not yet done), for `Computation.idle`.
_ASSIGNED = operator.attrgetter("assigned")


def _ahead(mean: float | None) -> int:
    """How many jobs a worker may hold behind the one it runs (`AHEAD_SECONDS`)."""
    if mean is None or mean >= PREFETCH_BELOW:
        return 0
    if mean * MAX_AHEAD <= AHEAD_SECONDS:
        return MAX_AHEAD
    return max(1, int(AHEAD_SECONDS / mean))


def _small(buffers: list[memoryview]) -> bool:
    """Whether a job's arguments are small enough to wait in a worker's socket."""
    size = 0
    for buffer in buffers:
        size += buffer.nbytes
        if size >= AHEAD_BYTES:
            return False
    return True


def _mark_retrieved(future: asyncio.Future[None]) -> None:
    """Read a done future's exception (asyncio logs one nobody read)."""
    if not future.cancelled():
        future.exception()


class Computation(
    _WorkerReports, _JobStops, _WorkerLife, _JobFiles, _WorkStealing, _ComputationState
):
    """Runs one computation's jobs on this node's CPUs, within the node's budget."""

    def __init__(
        self,
        *,
        comp_id: int,
        name: str,
        workers: int,
        path: str,
        budget: CpuBudget,
        report: Report,
        report_provisional: ReportProvisional,
        report_file: ReportFile,
        store: FileStore,
        refused_files: Mapping[str, str] | None = None,
        node_name: str,
        node_address: str,
        max_message_size: int,
        remove_path: bool,
        home: str | None = None,
        removals: Removals | None = None,
        path_users: collections.Counter[str] | None = None,
        limits: JobLimits | None = None,
        node_stopping: Callable[[], bool] | None = None,
        launcher: Launcher = PROCESS_LAUNCHER,
    ) -> None:
        self.comp_id = comp_id
        self._node_stopping = node_stopping or (lambda: False)
        self.name = name
        self.path = path
        self._n_workers = workers
        self._budget = budget
        self._report = report
        self._report_provisional = report_provisional
        self._report_file = report_file
        #: Files sent to the client, awaiting its answer: request -> the worker
        #: waiting, its own number for the file (`nodeserver.ipc.SendFile`) and,
        #: for a computation kept for recovery, the file (`KeepableFile`).
        self._file_requests: dict[int, tuple[Worker, int, KeepableFile | None]] = {}
        #: Keeps a file its client cannot take for recovery (`also_keep`).
        self._keep_file: KeepFile | None = None
        self._file_request_ids = itertools.count(1)
        self._store = store
        # Why the session refused a file (its quota, say): a job that needs it
        # says so, not that the file never came.
        self._refused_files = refused_files if refused_files is not None else {}
        self._job_files: collections.Counter[str] = collections.Counter()
        #: The computation's own files (its ``depends``): relative path -> digest.
        #: A job given one of them too (``dispy_job_depends``) leaves it in place.
        self._own_files: dict[str, str] = {}
        # Digests of objects put in the cluster (dispynb.objects), held in the
        # store while the computation lives (removed once nobody else holds them).
        self._objects: set[str] = set()
        self._node_name = node_name
        self._node_address = node_address
        self._max_size = max_message_size
        self._remove_path = remove_path
        #: The directory above ``path`` made for its client's session: it and the
        #: directories between go once empty, as the computation closes.
        self._home = home
        #: Notes ``path`` while it exists if it is to go (`nodeserver.leftovers`).
        self._removals = removals
        #: The node's count of live computations in each directory: computations
        #: given one ``dest_path`` share it, and it goes only with the last.
        self._path_users = path_users
        self.limits = limits or JobLimits()
        self._queue: collections.deque[NodeJob] = collections.deque()
        self._workers: dict[int, Worker] = {}
        self._exits: dict[int, int] = {}
        self._first_cgroup: str | None = None  # see start()
        self._launcher = launcher
        self._process: ComputationProcess | None = None
        self._control: ControlChannel | None = None
        self._loaded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A start that failed before awaiting it (closed during setup) leaves the
        # process's answer unread: not worth asyncio's "never retrieved" error.
        self._loaded.add_done_callback(_mark_retrieved)
        self._control_closed = asyncio.Event()
        self._progress: asyncio.Future[None] | None = None
        self._ready = False
        self._mean: float | None = None  # mean job time; None until a job ends
        self._closing = False
        self._ending: asyncio.Task[None] | None = None
        self._continued = 0
        # The node shuts down (hand_back): no new jobs; close() still ends it all.
        self._handed_back = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._held = False  # workers are not read (the client is not reading)
        self._steal_timer: asyncio.Handle | None = None  # see nodeserver.stealing
        #: Buffer kinds of the result being reported (key -> `Done.kinds`), for
        #: whoever sends it in chunks (the session, the kept results' spool).
        self.result_kinds: dict[int, str] = {}
        #: Its workers' results in shared memory (the node unlinks those it drops).
        self.result_objects = ResultObjects(path)
        self.on_failure: Callable[[str], None] | None = None
        #: ``on_start(key, attempt, time)``: a job starts executing in a worker now.
        self.on_start: Callable[[int, int, float], None] | None = None
        #: Called when a job or the cleanup calls ``dispynode_shutdown()``.
        self.on_shutdown_request: Callable[[], None] | None = None

    # -- lifecycle -----------------------------------------------------------------

    # -- jobs ----------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """True when no job is queued or running here."""
        # Asked after every result: C-level iteration, no generator.
        return not self._queue and not any(map(_ASSIGNED, self._workers.values()))

    def submit(self, jobs: list[NodeJob]) -> None:
        """Queue jobs and start as many as the CPUs allow."""
        if self._closing or self._handed_back:
            for job in jobs:
                self._finish_unrun(job, "the computation is closing")
            return
        self._queue.extend(jobs)
        self._pump()

    def hold_workers(self, hold: bool) -> None:
        """Stop (``hold``) or resume reading from the workers: back-pressure from a
        client that does not read. A held worker blocks once its socket is full.

        Held, its busy workers lend their CPUs to the other computations (a job it
        starts on a free CPU lends it at once): blocked on what its client does not
        take, they would keep them for as long as it does not read (a client
        stopped, or on a slow link), and every other client's jobs would wait.
        Back, they take them again, over the count if need be, until they end."""
        self._held = hold
        for worker in self._workers.values():
            worker.conn.hold_reading(hold)
            if hold and worker.holds_cpu:
                worker.holds_cpu = False
                worker.lent_cpu = True
                self._budget.release()
            elif not hold and worker.lent_cpu:
                worker.lent_cpu = False
                if worker.assigned and worker.returncode is None:
                    worker.holds_cpu = True
                    self._budget.take()
        if not hold:
            self._pump_soon()

    def also_report(self, record: Report) -> None:
        """Give every later job result to ``record`` too (kept for recovery)."""
        report = self._report

        def both(entry: list[object], buffers: list[memoryview]) -> None:
            report(entry, buffers)
            record(entry, buffers)

        self._report = both

    def also_keep(
        self,
        provisional: ReportProvisional,
        keep_file: KeepFile,
    ) -> None:
        """Give every later provisional result to ``provisional`` too, and a file
        its client cannot take to ``keep_file`` (kept for recovery), which says
        what the job is told instead (None: not kept)."""
        report, report_file = self._report_provisional, self._report_file

        def both(key: int, attempt: int, buffers: list[memoryview]) -> None:
            report(key, attempt, buffers)
            provisional(key, attempt, buffers)

        def sent_or_kept(
            key: int, path: str, buffers: list[memoryview], request: int
        ) -> str:
            error = report_file(key, path, buffers, request)
            if error:
                return keep_file(key, path, buffers) or error
            return error

        self._report_provisional, self._report_file = both, sent_or_kept
        self._keep_file = keep_file

    def _pump(self) -> None:
        """Give queued jobs to workers: idle ones first (taking a CPU), then ahead."""
        # Closing without terminate still runs what is queued (a kept computation
        # whose client went away has a backlog); terminate emptied the queue.
        if not self._queue:
            return
        workers = [w for w in self._workers.values() if w.returncode is None]
        # fresh_process keeps spare workers: never run more jobs than asked for.
        room = len(workers)
        if self.limits.fresh_process:
            room = self._n_workers - sum(1 for w in workers if w.assigned)
        for worker in workers:
            if not self._queue or room <= 0:
                return
            if not worker.assigned and not worker.stream_closed and not worker.retiring:
                room -= 1
                if self._held:  # a CPU that is free, lent at once (hold_workers)
                    if not self._budget.free():
                        break
                    worker.lent_cpu = True
                elif not self._budget.try_acquire():
                    break
                else:
                    worker.holds_cpu = True
                self._send(worker, self._queue.popleft())
        if self._mean is None or self._mean >= PREFETCH_BELOW:
            return  # unknown or long jobs: never make a job wait behind another
        if self.limits.fresh_process:
            return  # a worker runs one job, then exits: nothing may wait in it
        if len(workers) < self._n_workers:
            # Workers still starting take the queue when they connect: a job sent
            # ahead now could wait behind a long one while they sit idle.
            return
        # Topped up once half of its jobs ahead are done, a few in one write.
        target = _ahead(self._mean)
        queue = self._queue
        for worker in workers:
            if not queue:
                return
            ahead = len(worker.assigned) - 1
            if (
                ahead < 0
                or ahead > target // 2
                or worker.stream_closed
                or worker.retiring
                or worker.interrupted  # replaced once its job ends: it would die there
                or worker.stalled
            ):
                continue
            batch: list[NodeJob] = []
            while queue and ahead < target:
                if ahead and queue[0].files:
                    break  # files: one ahead, as for long jobs
                if not _small(queue[0].buffers) and (
                    ahead or segments(queue[0].buffers) is None
                ):
                    # Large arguments: one ahead, and only if they go as shared
                    # memory. Through the worker's socket they would sit in this
                    # node's write buffer until the running job ends: a cancel
                    # unless started could not be answered before that (the Skip
                    # waits behind them), nor a Skip for another job be sent.
                    break
                batch.append(queue.popleft())
                ahead += 1
            if batch:
                self._send_many(worker, batch)

    def _send(self, worker: Worker, job: NodeJob) -> None:
        self._send_many(worker, [job])

    def _send_many(self, worker: Worker, jobs: list[NodeJob]) -> None:
        """Hand jobs to a worker in order; small ones leave in one write."""
        runs: list[tuple[Message, list[memoryview]]] = []
        started: NodeJob | None = None  # the worker's head job, if it is one of these
        for job in jobs:
            if job.files and not job.placed:
                try:
                    self._place_job_files(job)
                except (DispynbError, OSError) as exc:
                    job.reported = True
                    reason = f"cannot place the job's files on the node: {exc}"
                    self._report_unrun(job, CRASHED, reason)
                    self._pump_soon()
                    continue
            worker.assigned.append(job)
            worker.runs += 1
            job.run = worker.runs
            ahead = len(worker.assigned) > 1  # behind another: a Skip may follow it
            # Arguments received in shared memory go as the memfd and where they lie
            # in it; the worker maps them (no copy through its socket).
            shared = segments(job.buffers)
            if shared is None:
                run = Run(
                    key=job.key,
                    attempt=job.attempt,
                    mem_limit=job.mem_limit,
                    ahead=ahead,
                )
                runs.append((run, job.buffers))
            else:
                job.lease, layout = shared
                run = Run(
                    key=job.key,
                    attempt=job.attempt,
                    mem_limit=job.mem_limit,
                    shared=layout,
                    ahead=ahead,
                )
                # If the worker is dying, its exit report requeues or fails the job.
                with contextlib.suppress(DispynbError):
                    if runs:
                        worker.conn.write_many(runs)
                        runs = []
                    worker.conn.write(run, (), (job.lease.fd,))
            if len(worker.assigned) == 1:
                job.buffers = []  # a job sent ahead keeps them: it may be requeued
                started = job
        if runs:
            with contextlib.suppress(DispynbError):
                if len(runs) == 1:
                    worker.conn.write(*runs[0])
                else:
                    worker.conn.write_many(runs)
        if not worker.assigned:
            # Every job failed before it left (its files were not here): the CPU
            # `_pump` took for the worker is free again, or the node runs no more.
            self._release_cpu(worker)
        # Its start is noted (for the client) and its time limit armed once it is on
        # its way: the worker runs it meanwhile (a round trip's latency, W2). Nothing
        # the worker answers is read before this callback returns.
        if started is not None and worker.assigned and worker.assigned[0] is started:
            self._start_clock(worker)

    def starts(self) -> list[list[Any]]:
        """`JobResults.started` entries of its jobs running now whose start its
        client was told: a client recovering them (`recover_jobs`) shows them
        Running from then, as the client that went did."""
        return [
            [job.key, job.attempt, job.start_time, 0]
            for worker in self._workers.values()
            if worker.assigned
            and (job := worker.assigned[0]).start_time
            and not job.reported
        ]

    def _pump_soon(self) -> None:
        asyncio.get_running_loop().call_soon(self._pump)

    def _requeue_or_fail(self, job: NodeJob) -> None:
        """Put a job that did not complete back at the head of the queue."""
        job.moving = False
        if job.buffers:
            self._queue.appendleft(job)
            return
        job.reported = True
        reason = "the job's worker was stopped and its arguments are gone"
        self._report_unrun(job, CRASHED, reason)

    def _release_cpu(self, worker: Worker) -> None:
        worker.lent_cpu = False  # (lent: released already)
        if worker.holds_cpu:
            worker.holds_cpu = False
            self._budget.release()

    # -- messages from the computation process ------------------------------------
