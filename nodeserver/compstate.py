"""What the node server knows of a computation's jobs (`NodeJob`, `JobLimits`) and
workers (`Worker`), and the state every part of `Computation` shares."""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from dispynb.protocol.messages import CRASHED
from dispynb.protocol.records import ResultEntry
from dispynb.transport.connection import Connection
from nodeserver.budget import CpuBudget
from nodeserver.containment import HeldWorker
from nodeserver.control import ControlChannel
from nodeserver.filestore import FileStore
from nodeserver.ipc import Done, SendFile
from nodeserver.launcher import ComputationProcess, Launcher
from nodeserver.leftovers import Removals
from nodeserver.resultobjects import ResultObjects
from nodeserver.sharedbody import SharedBody

#: Logs as the computation it serves.
logger = logging.getLogger("nodeserver.computation")

#: ``report(entry, buffers)``: one job-results entry (see `JobResults`) and its buffers.
Report = Callable[[list[object], list[memoryview]], None]

#: ``report_provisional(key, attempt, buffers)``: a provisional result of a job.
ReportProvisional = Callable[[int, int, list[memoryview]], None]

#: ``report_file(key, path, buffers, request)``: a file a job sends to its client,
#: which answers ``request`` (not 0) with `Computation.file_saved`; returns why it
#: could not be sent ("" once it is on its way).
ReportFile = Callable[[int, str, list[memoryview], int], str]

#: ``keep_file(key, path, buffers)``: keep a file its client cannot take for its
#: recovery; what the job is told (None: not kept).
KeepFile = Callable[[int, str, list[memoryview]], str | None]

#: A file sent to the client that the node may still keep: ``(key, path, buffers)``.
KeepableFile = tuple[int, str, list[memoryview]]


@dataclass(frozen=True, slots=True)
class JobLimits:
    """What a computation's client asked for its jobs (see `nodeserver.ipc.Load`)."""

    max_output: int | None = None
    max_result: int | None = None
    max_pids: int | None = None
    fresh_process: bool = False
    #: The largest message the client takes (None: not said): a file a job sends
    #: must fit in one.
    max_message: int | None = None


@dataclass(slots=True)
class NodeJob:
    """A job on this node: its key, attempt and pickled arguments."""

    key: int
    attempt: int
    buffers: list[memoryview]
    cancelled: bool = False
    skipping: bool = False  # sent ahead, then asked to skip if it has not started
    #: Sent ahead to a worker whose running job is being stopped: the worker is
    #: told to skip it, and it runs on another (the interrupted one is replaced).
    moving: bool = False
    reported: bool = False  # its outcome already went to the client
    #: Dropped (close_node, the node's shutdown) while its worker may have started
    #: it: ``(outcome, reason)`` it is reported with if the worker skips it.
    dropped: tuple[str, str] | None = None
    #: Its start was not reported when it became its worker's head (it might be
    #: skipped: cancelled, skipping, moving): reported with its end if it ran.
    start_held: bool = False
    #: When it started, as its client was told (0.0: not told yet).
    start_time: float = 0.0
    #: ``(path, digest, executable)`` of each of its own files.
    files: list[tuple[str, str, bool]] = field(default_factory=list)
    placed: bool = False  # its files are in the computation's directory
    timeout: float | None = None  # seconds it may run (job_timeout)
    mem_limit: int | None = None  # bytes of address space (mem_limit)
    timer: asyncio.TimerHandle | None = None  # ends it at its timeout
    timed_out: bool = False  # stopped for running over its timeout
    #: The number of its `Run` on its worker's channel (`Worker.runs`): what the
    #: worker's interrupt page names when the node interrupts it.
    run: int = 0
    #: The shared body its arguments were sent to a worker in: held until the job
    #: ends (the worker may still be reading it), then free for another frame.
    lease: SharedBody | None = None


@dataclass(slots=True, eq=False)
class Worker:
    """A worker process of the computation, seen from the node server."""

    pid: int
    conn: Connection
    sock: socket.socket
    #: Signalled through this, never by pid (which may be reused once it exited).
    process: HeldWorker
    #: Its interrupt page (`nodeserver.ipc.InterruptPage`) and the memfd it was
    #: sent as (held until the worker is lost), or None where none could be made.
    page: memoryview | None = None
    page_fd: int | None = None
    #: The files of its descriptors 1 and 2 (`nodeserver.fdoutput`), or None.
    output_fds: tuple[int, int] | None = None
    runs: int = 0  # Runs written to it
    assigned: collections.deque[NodeJob] = field(default_factory=collections.deque)
    returncode: int | None = None
    exit_reason: str = ""  # why the computation process killed it, if it did
    #: Why the node killed it for what it wrote to its channel (`channel_reason`).
    channel_error: str = ""
    stream_closed: bool = False
    holds_cpu: bool = False
    #: Its CPU lent to other computations while its client is not reading
    #: (`Computation.hold_workers`); taken back when it reads again.
    lent_cpu: bool = False
    interrupted: bool = False  # sent SIGINT to cancel its running job
    retiring: bool = False  # killed on purpose: its unfinished jobs run elsewhere
    #: Its jobs sent ahead were taken back (its running job outlasted the others'):
    #: none go ahead to it until that job ends.
    stalled: bool = False
    #: ``(key, attempt)`` of the jobs taken back from it once it was sure to skip
    #: them (`Computation._take_back`): its word that it skipped each is dropped.
    taken_back: list[tuple[int, int]] = field(default_factory=list)
    #: The node looks at its jobs ahead again once it read a message from it, or
    #: once its Runs are all written (`Computation._look_again`).
    look_on_read: bool = False
    drain_watched: bool = False
    #: Lines logged about messages on its channel that no job of its sends (a
    #: job forging them): the first at its level, the others at debug level.
    odd_messages: int = 0

    def log_odd(self, level: int, text: str, *args: object) -> None:
        """Log a line about a message from the worker that no job of its sends: the
        first at ``level``, the others at debug level (a job forging them made a
        line each: 100,000 lines, 10 MB of the node's log, in 6 s)."""
        self.odd_messages += 1
        if self.odd_messages == 1:
            text += " (more such from this worker are logged at debug level)"
        else:
            level = logging.DEBUG
        logger.log(level, text, *args)


class _ComputationState:
    """A `Computation`'s state (its parts: `nodeserver.jobstops`, stopping jobs;
    `nodeserver.workerlife`, the computation process's reports and lost workers;
    `nodeserver.jobfiles`, the jobs' files; `nodeserver.stealing`, work stealing;
    `nodeserver.workerreports`, what the workers report of their jobs).

    The methods declared here and raising `NotImplementedError` are the parts'
    own (one part calls another's)."""

    # Set by `Computation.__init__` (see there).
    comp_id: int
    name: str
    path: str
    limits: JobLimits
    on_failure: Callable[[str], None] | None
    on_start: Callable[[int, int, float], None] | None
    on_shutdown_request: Callable[[], None] | None
    result_kinds: dict[int, str]
    result_objects: ResultObjects
    _node_stopping: Callable[[], bool]
    _n_workers: int
    _budget: CpuBudget
    _report: Report
    _report_provisional: ReportProvisional
    #: Mean job time (s); None until a job ends.
    _mean: float | None
    _store: FileStore
    _max_size: int
    _node_name: str
    _node_address: str
    _remove_path: bool
    _own_files: dict[str, str]
    _home: str | None
    _removals: Removals | None
    _path_users: collections.Counter[str] | None
    #: ``path`` is counted in `_path_users` (`_WorkerLife.start` to its close).
    _path_counted: bool = False
    #: The note of ``path`` in `_removals`, while it is noted (`_WorkerLife.start`).
    _removal_note: str | None = None
    _objects: set[str]
    _process: ComputationProcess | None
    _control: ControlChannel | None
    _first_cgroup: str | None
    _queue: collections.deque[NodeJob]
    _workers: dict[int, Worker]
    _launcher: Launcher
    _loaded: asyncio.Future[None]
    _control_closed: asyncio.Event
    _progress: asyncio.Future[None] | None
    _ready: bool
    _closing: bool
    #: Once its jobs are over, `close`'s end of the process (a task: see `close`).
    _ending: asyncio.Task[None] | None
    #: Times its process was found stopped and continued (`_watch_stopped`).
    _continued: int
    _handed_back: bool
    _tasks: set[asyncio.Task[None]]
    _held: bool
    _steal_timer: asyncio.Handle | None
    _report_file: ReportFile
    _file_requests: dict[int, tuple[Worker, int, KeepableFile | None]]
    _keep_file: KeepFile | None
    _file_request_ids: Iterator[int]
    _refused_files: Mapping[str, str]
    _job_files: collections.Counter[str]

    def _report_unrun(
        self,
        job: NodeJob,
        outcome: str,
        reason: str,
        output: tuple[str, str] = ("", ""),
    ) -> None:
        """Report a job that ended without a result (``reason`` says why; ``output``:
        its stdout and stderr, what its dead worker wrote below Python)."""
        entry = ResultEntry.unrun(job.key, job.attempt, outcome, reason)
        if output[0] or output[1]:
            entry = entry._replace(stdout=output[0], stderr=output[1])
        self._report(entry.to_wire(), [])

    def _report_stopped_by_node(self, job: NodeJob) -> None:
        """Report a job known to have started (its client was told) that the node
        stopped to replace its worker after cancelling the job before it: crashed,
        as a job whose worker died (its client decides whether to run it again)."""
        job.reported = True
        reason = (
            "its worker was stopped by the node: the job before it there was "
            "cancelled as this one started"
        )
        self._report_unrun(job, CRASHED, reason)

    # -- the parts' methods, declared for the others --

    def _pump(self) -> None:
        raise NotImplementedError

    def client_lost(self, reason: str, keep: bool = False) -> None:
        raise NotImplementedError

    async def _read_worker(self, worker: Worker) -> None:
        raise NotImplementedError

    def _requeue_or_fail(self, job: NodeJob) -> None:
        raise NotImplementedError

    def _release_cpu(self, worker: Worker) -> None:
        raise NotImplementedError

    def _release_job_files(self, job: NodeJob) -> None:
        raise NotImplementedError

    def _finish_killed(self, job: NodeJob) -> None:
        raise NotImplementedError

    def _finish_unrun(self, job: NodeJob, reason: str) -> None:
        raise NotImplementedError

    def _runs_after_all(self, job: NodeJob, start_time: float) -> None:
        raise NotImplementedError

    def _file_cap(self) -> int:
        raise NotImplementedError

    def _on_send_file(
        self, worker: Worker, message: SendFile, buffers: list[memoryview]
    ) -> None:
        raise NotImplementedError

    def _shutdown_requested(self) -> None:
        raise NotImplementedError

    def _maybe_lost(self, worker: Worker) -> None:
        raise NotImplementedError

    def _note_progress(self) -> None:
        raise NotImplementedError

    def _result_cap(self) -> int:
        raise NotImplementedError

    def _provisional_cap(self) -> int:
        raise NotImplementedError

    def _max_output(self) -> int:
        raise NotImplementedError

    def _start_clock(self, worker: Worker) -> None:
        raise NotImplementedError

    def _retire(self, worker: Worker) -> None:
        raise NotImplementedError

    def _interrupt_if_head(self, worker: Worker) -> None:
        raise NotImplementedError

    def _steal_soon(self) -> None:
        raise NotImplementedError

    def _steal_later(self) -> None:
        raise NotImplementedError

    def _skipped_taken_back(self, worker: Worker, done: Done) -> bool:
        raise NotImplementedError
