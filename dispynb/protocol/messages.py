"""Message schema of the client-node wire protocol: one frozen dataclass per op.

The codec and the `Message` base they share with the node's internal channels
live in `dispynb.protocol.schema` (also importable from here).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dispynb.protocol.schema import Message as Message
from dispynb.protocol.schema import message as message
from dispynb.protocol.schema import pack_header as pack_header
from dispynb.protocol.schema import unpack_header as unpack_header

PROTOCOL_VERSION = 4


class WireMessage(Message, family=True):
    """Messages between a client and a node server."""


# --- handshake -------------------------------------------------------------------


@message("hello")
class Hello(WireMessage):
    """Client -> node: opens the handshake."""

    version: int
    role: str
    nonce: bytes
    name: str = ""


@message("challenge")
class Challenge(WireMessage):
    """Node -> client: the node's nonce (its proof comes only after the client's)."""

    version: int
    role: str
    nonce: bytes


@message("auth")
class Auth(WireMessage):
    """Either way: a proof of knowing the secret (the client's, then the node's)."""

    proof: bytes


@message("welcome")
class Welcome(WireMessage):
    """Node -> client, first signed message: who the node is."""

    name: str
    cpus: int
    platform: str
    address: str
    max_message_size: int
    pid: int
    #: ``[cpu %, memory bytes, disk bytes, swap %]`` available, if the node knows
    #: (``[]``: it does not report them; None for a figure it cannot read now).
    avail: list[float | None] = dataclasses.field(default_factory=list)
    #: The node's machine's boot id ("" if unknown): with a loopback connection and
    #: ``pid``, it tells the client the node shares its memory (`protocol.shm`).
    boot_id: str = ""
    #: The Python version jobs run with (``platform.python_version()``; "" if not
    #: said, as a scheduler does): a function sent by value is compiled code, which
    #: only runs on the Python version (major.minor) that compiled it.
    python: str = ""
    #: The node's pid namespace (`protocol.shm.pid_namespace`; 0 if unknown): ``pid``
    #: names the node only in that namespace.
    pid_namespace: int = 0


@message("error")
class Error(WireMessage):
    """Either way: a refusal or failure that ends the exchange (or the connection)."""

    code: str
    message: str
    version: int = PROTOCOL_VERSION
    #: The jobs it concerns, when not all of the exchange's (`KEPT_UNAVAILABLE`:
    #: those whose results the node cannot read now); None: all.
    keys: list[int] | None = None


#: `Error.code` of a node that cannot read the results it kept for a recovering
#: client now (short of memory or descriptors): that ``recover_jobs`` gives up the
#: node, whose results stay kept for the next. With `Error.keys`, only those jobs'
#: results: its other jobs (running there, or never there) are left as they are.
KEPT_UNAVAILABLE = "kept-unavailable"

#: `Error.code` of a node refusing a client at accept because it takes no new
#: ones (``--serve N`` reached): the message says why.
NOT_SERVING = "not-serving"


# --- computations and jobs -------------------------------------------------------


@message("computation-setup")
class ComputationSetup(WireMessage):
    """Client -> node: load a computation; buffers hold its pickled bundle."""

    comp_id: int
    name: str
    workers: int
    dest_path: str | None = None
    cleanup: bool = True
    #: ``[relative_path, digest, size]`` of each file the computation depends on,
    #: with a fourth item ``True`` for a program (kept executable on the node).
    files: list[list[Any]] = dataclasses.field(default_factory=list)
    #: Seconds between the node's status reports (dispy's ``pulse_interval``).
    pulse_interval: float | None = None
    #: Seconds the setup function may take; None waits for ever.
    setup_timeout: float | None = None
    #: With a recovery id, the node keeps the computation (its jobs run on, results
    #: are kept ``keep_results`` seconds) if this client's connection is lost.
    recovery_id: str | None = None
    keep_results: float = 0.0
    #: Keep (for recovery) the results sent while the client is connected too;
    #: False keeps only those that end after it is gone (dispy's default recovery).
    keep_sent: bool = True
    #: With ``keep_sent``: the client says which results it has journaled
    #: (`ResultsJournaled`) if the node's `ComputationReady` offers it
    #: (``acks_journaled``); the node then needs not keep those.
    ack_journaled: bool = False
    #: Per job: characters of stdout and of stderr kept (None: all), bytes of the
    #: pickled result (None: as the node's message cap allows), tasks its processes
    #: may have (None: no limit); ``fresh_process``: one worker process per job.
    max_output: int | None = None
    max_result: int | None = None
    max_pids: int | None = None
    fresh_process: bool = False
    #: For a shared scheduler (nodes ignore them): jobs of a lost node run again
    #: elsewhere; the computation wants the nodes to itself (dispy's ``exclusive``).
    reentrant: bool = False
    exclusive: bool = False
    #: For a shared scheduler: the client decides each node's use (its
    #: `NodeAllocate.allocate`, dispy's per node), so none of its jobs go to a node
    #: until its client's `NodeManage` (``"cpus"``, or ``"close"``) for it.
    allocates: bool = False
    #: The largest message the client accepts (0: not said, the default's): a node
    #: sends this computation's results, and their output, within it (in chunks).
    max_message_size: int = 0
    #: The client's Python version (major.minor) if code of its program travels
    #: compiled (functions sent by value), else "": a node on another version
    #: refuses the computation, which it could not run (a shared scheduler then
    #: uses only its nodes of that version).
    python: str = ""

    def bad_seconds(self) -> str | None:
        """Why a field in seconds cannot be used (NaN, infinite, negative; zero for
        ``setup_timeout``), for the refusal; None if all can. `JobCluster` never
        sends such values: a raw client could, and a NaN timer breaks the
        order of asyncio's timers (others, other clients' too, fire late)."""
        for name, value, zero in (
            ("setup_timeout", self.setup_timeout, False),
            ("keep_results", self.keep_results, True),
            ("pulse_interval", self.pulse_interval, True),
        ):
            if value is None or 0 < value < math.inf or (zero and value == 0):
                continue
            least = "0 or more" if zero else "over 0, or None"
            return (
                f"computation-setup field {name!r} is {value!r}: it must be a "
                f"finite number of seconds, {least}"
            )
        return None


@message("computation-ready")
class ComputationReady(WireMessage):
    """Node -> client: the computation is set up and has ``workers`` processes.

    ``acks_journaled``: the node keeps this computation's results for recovery and
    takes `ResultsJournaled` for it (asked for with ``ack_journaled``; never from a
    node that predates it, which a client must then send none).

    ``pins``: a shared scheduler that runs a job on the node its `JobSubmit` pins
    it to (``submit_node``); never a node server, nor a scheduler that predates it.

    ``manages``: the `NodeManage` actions a shared scheduler takes for this
    computation (``deallocate_node``...); never from a node server.
    """

    comp_id: int
    workers: int
    acks_journaled: bool = False
    pins: bool = False
    manages: list[str] = dataclasses.field(default_factory=list)


@message("computation-failed")
class ComputationFailed(WireMessage):
    """Node -> client: the computation could not be set up (or its process died)."""

    comp_id: int
    message: str
    traceback: str = ""


@message("computation-close")
class ComputationClose(WireMessage):
    """Client -> node: close the computation; ``terminate`` kills running jobs.

    ``cancel_waiting``: jobs that have not started are cancelled, not run
    (``close_node``); running ones finish unless ``terminate``.
    """

    comp_id: int
    terminate: bool = False
    cancel_waiting: bool = False


@message("computation-closed")
class ComputationClosed(WireMessage):
    """Node -> client: the computation is gone from the node."""

    comp_id: int


@message("job-submit")
class JobSubmit(WireMessage):
    """Client -> node: a batch of jobs.

    ``jobs`` holds ``[key, attempt, buffer_count]`` per job, plus a fourth item
    ``[[relative_path, digest], ...]`` for a job with its own files (with a third
    item ``True`` for a program, kept executable on the node); the job's pickled
    arguments are the next ``buffer_count`` message buffers, in order.

    ``limits`` holds ``[key, timeout, mem_limit]`` for each job that has a limit:
    seconds it may run and bytes of address space its worker may use (each None for
    no limit). A node that predates it ignores it and runs the jobs unlimited.

    ``pins`` holds ``[key, node]`` for each job that must run on that node (its
    `dispynb.protocol.records.SharedNodeEntry` ``node_id``) and on no other: sent
    only to a shared scheduler whose `ComputationReady` said ``pins``
    (``submit_node``); a node server gets none.
    """

    comp_id: int
    jobs: list[list[Any]]
    limits: list[list[Any]] = dataclasses.field(default_factory=list)
    pins: list[list[Any]] = dataclasses.field(default_factory=list)


@message("job-cancel")
class JobCancel(WireMessage):
    """Client -> node: terminate a job (queued or running).

    ``unstarted``: drop it only if it has not started (`concurrent.futures`'
    ``cancel()``); a running job goes on, and the client learns which happened from
    the job's outcome (``cancelled``) or its start (`JobResults`).
    """

    comp_id: int
    key: int
    attempt: int
    unstarted: bool = False


@message("results-journaled")
class ResultsJournaled(WireMessage):
    """Client -> node (or ``dispynb-scheduler``): the client has these results of
    ``comp_id`` in its recovery journal (committed), ``[key, attempt]`` each: the
    node needs not keep them for its recovery. Sent only where `ComputationReady`
    said ``acks_journaled``; a result not acknowledged stays kept."""

    comp_id: int
    jobs: list[list[int]]


@message("ping")
class Ping(WireMessage):
    """Client -> node, every pulse: the client is alive (nodes free silent ones)."""


@message("recover")
class Recover(WireMessage):
    """Client -> node: results of the kept computation ``recovery_id``, please.

    They come as `JobResults` for ``comp_id``, one result each (a large one streamed
    in `ResultChunk` messages first, as a live one), then `Recovered`; results of
    jobs still running follow as they end, then `ComputationClosed`.
    """

    comp_id: int
    recovery_id: str
    #: The largest message the client accepts (0: not said, the default's): larger
    #: results come in chunks.
    max_message_size: int = 0
    #: Seconds between the node's status reports while the client waits for jobs
    #: still running (0: none): its sign of life, as a cluster's pulse.
    pulse_interval: float = 0.0


@message("recovered")
class Recovered(WireMessage):
    """Node -> client: every stored result was sent; ``running``: jobs not ended yet."""

    comp_id: int
    found: bool
    running: bool
    #: Not found for this user, but a shared scheduler keeps it for another: the
    #: client recovers with the wrong credential, and its jobs are not lost.
    other_user: bool = False
    #: The node process that ran the computation died while it did (killed, its
    #: machine stopped); this one offers what that one kept: a job whose end is not
    #: among them was lost with it (it had not "never reached" the node).
    cut_short: bool = False


@message("node-status")
class NodeStatus(WireMessage):
    """Node -> client, periodically: resources available (as in `Welcome.avail`).

    Also sent once when the node starts to shut down, with ``leaving`` saying why
    (and how long running jobs may go on): the client sends it no more jobs, runs a
    reentrant computation's jobs elsewhere at once, and names the reason when the
    jobs still running there end with the node. "" while it serves.
    """

    avail: list[float | None]
    leaving: str = ""


@message("node-health")
class NodeHealth(WireMessage):
    """Node -> health probe (``dispynb-node --check``), then the node closes: how
    it is. A probe is no client: no session, nothing logged above debug level, and
    it counts for neither ``--serve`` nor ``--exit-without-client``."""

    name: str
    #: The dispynb version the node runs.
    version: str
    pid: int
    #: Seconds since the node started.
    uptime: float
    cpus: int
    #: CPUs running jobs now.
    busy: int
    #: Client sessions, and their computations (kept ones of gone clients too).
    clients: int
    computations: int
    #: Whether it accepts new clients (False outside its service window, or once
    #: ``--serve`` clients came), and whether it is shutting down.
    serving: bool
    draining: bool
    #: What answered: ``"node"`` (a ``dispynb-node``; also an older server, which
    #: did not say) or ``"scheduler"``: a check of one at the other's port (both
    #: answer the probe) must not report it as what it looked for.
    server: str = "node"


@message("scheduler-nodes")
class SchedulerNodes(WireMessage):
    """Shared scheduler -> client: the nodes behind it, as one computation sees them.

    ``nodes`` holds a `dispynb.protocol.records.SharedNodeEntry` per node where the
    computation is set up now (a node no longer listed has left). Only the
    computation's own jobs are counted: a client learns nothing of other users'.
    Sent when that set changes and, while the counts change, at the pulse; a node
    server never sends it. ``left`` says why each node that left since the last
    report did, in the node's words when it said them (its node id to the reason);
    ``requeued`` the keys of the jobs that had started on them and wait to run
    again elsewhere (``reentrant``): their next start is reported again.
    ``platforms`` gives each node's ``platform.platform()`` as it said it (node id
    to text; a node not in it, or an older scheduler's report: unknown), for
    `NodeAllocate.allocate` (a client that predates it ignores it).
    """

    comp_id: int
    nodes: list[list[Any]]
    left: dict[str, str] = dataclasses.field(default_factory=dict)
    requeued: list[int] = dataclasses.field(default_factory=list)
    platforms: dict[str, str] = dataclasses.field(default_factory=dict)


@message("jobs-placed")
class JobsPlaced(WireMessage):
    """Shared scheduler -> client: the jobs ``keys`` went to the node ``node`` (its
    `dispynb.protocol.records.SharedNodeEntry` ``node_id``), sent before they do,
    so that the client names the node a job runs on (dispy's ``DispyJob.ip_addr``
    and the ``cluster_status`` node) from its start; a node server never sends it.
    Kept, with the results, for a client that recovers them (`Recover`), which
    names that node too; ``attempts``: each job's attempt (in the order of
    ``keys``), whose results' acknowledgement (`ResultsJournaled`) lets it go.
    """

    comp_id: int
    node: str
    keys: list[int]
    attempts: list[int] = dataclasses.field(default_factory=list)


@message("node-manage")
class NodeManage(WireMessage):
    """Client -> shared scheduler: how the computation uses ``node`` (the
    `dispynb.protocol.records.SharedNodeEntry` ``node_id`` of one of its nodes).

    ``action`` ``"deallocate"`` (``deallocate_node``): no more of its jobs go there
    (those there finish; its jobs pinned to it wait); ``"allocate"``
    (``allocate_node``): they go there again (a node it closed is set up again);
    ``"cpus"`` (``set_node_cpus``): at most ``cpus`` of its jobs run there at once
    (negative: all of the node's CPUs but that many; 0 is ``"deallocate"``);
    ``"close"`` (``close_node``): it is closed there (its running jobs finish, or
    are terminated with ``terminate``) and not set up there again until
    ``"allocate"``. Sent only for an action the scheduler's `ComputationReady`
    listed in ``manages``; answered with `NodeManaged`.
    """

    comp_id: int
    request: int
    node: str
    action: str
    cpus: int = 0
    terminate: bool = False


@message("node-managed")
class NodeManaged(WireMessage):
    """Shared scheduler -> client: answer to `NodeManage`; ``error`` is empty once
    done, else why it was not. ``cpus``: of a ``"cpus"`` action, the CPUs of the
    node the computation uses now."""

    comp_id: int
    request: int
    error: str = ""
    cpus: int = 0


@message("files-missing")
class FilesMissing(WireMessage):
    """Node -> client: send these files (by digest) before the computation starts."""

    comp_id: int
    digests: list[str]


@message("file-put")
class FilePut(WireMessage):
    """Client -> node: a file's content (one buffer), stored by its digest."""

    digest: str
    size: int


@message("file-release")
class FileRelease(WireMessage):
    """Client -> node (or shared scheduler): the jobs that needed these files (a
    job's own ``depends``, sent with `FilePut`) have ended; the node may let them go.
    The client sends a file again before a later job that needs it."""

    digests: list[str]


@message("file-place")
class FilePlace(WireMessage):
    """Client -> node: put a sent file into the computation's directory."""

    comp_id: int
    request: int
    path: str
    digest: str
    #: A program: kept executable (a node that predates it ignores it).
    executable: bool = False


@message("file-placed")
class FilePlaced(WireMessage):
    """Node -> client: answer to `FilePlace`; ``error`` is empty on success."""

    comp_id: int
    request: int
    error: str = ""


@message("file-from-node")
class FileFromNode(WireMessage):
    """Node -> client: a file a job sent with ``dispy_send_file`` (one buffer).

    ``request`` (not 0): the job waits for the client's `FileSaved` with it, to
    learn whether the file was written (dispy's return value of 0 or -1).
    """

    comp_id: int
    key: int
    path: str
    request: int = 0


@message("file-saved")
class FileSaved(WireMessage):
    """Client -> node: answer to a `FileFromNode` that asked for one; ``error`` is
    empty once the file is written, else why it was not (the job is told)."""

    comp_id: int
    key: int
    request: int
    error: str = ""


@message("job-provisional")
class JobProvisional(WireMessage):
    """Node -> client: a provisional result of a running job (buffers: the pickle)."""

    comp_id: int
    key: int
    attempt: int


#: Outcomes a node reports for a job.
FINISHED = "finished"  # returned normally; buffers hold the pickled result
RAISED = "raised"  # raised an exception (or sys.exit); see ``exception``
CRASHED = "crashed"  # its worker process died (os._exit, signal, segfault)
TERMINATED = "terminated"  # killed while running, at the client's request
CANCELLED = "cancelled"  # never started: cancelled, or its computation closed first
RETURNED = "returned"  # never started: handed back by a node that shuts down
#: Its node was lost while it ran (not reentrant): a scheduler reports it, as a client
#: that loses a node of its own ends the job (dispy's ``Abandoned``).
ABANDONED = "abandoned"
OUTCOMES = frozenset(
    {FINISHED, RAISED, CRASHED, TERMINATED, CANCELLED, RETURNED, ABANDONED}
)


@message("result-chunk")
class ResultChunk(WireMessage):
    """Node -> client: ``offset`` onwards of buffer ``index`` (``size`` bytes in all)
    of a large result, in the message's one buffer. Its job's entry in `JobResults`
    follows the last chunk, marked streamed; the client assembles the buffers in
    place, so neither side holds the result twice.
    """

    comp_id: int
    key: int
    attempt: int
    index: int
    offset: int
    size: int
    #: "b": the buffer becomes a ``bytes`` object (the client builds it directly).
    kind: str = ""


@message("job-results")
class JobResults(WireMessage):
    """Node -> client: a batch of results, and of job starts.

    ``results`` holds a `dispynb.protocol.records.ResultEntry` per job, as the array
    ``[key, attempt, outcome, start_time, end_time, stdout, stderr, exception,
    buffer_count]``; a finished job's pickled result is its next ``buffer_count``
    buffers, or, with a tenth item ``True``, the ``buffer_count``
    buffers sent before in `ResultChunk` messages (none in this message).

    ``started`` holds ``[key, attempt, start_time, before]`` for each job that began
    executing in a worker since the last batch (a job sent to a node may wait there
    behind others); ``before`` is how many of this message's ``results`` happened
    earlier, so the client replays starts and ends in the node's order. Starts ride on
    the results' message (a start waits a few milliseconds for one), so that they
    cost no message of their own. Empty from a node that predates it.
    """

    comp_id: int
    results: list[list[Any]]
    started: list[list[Any]] = dataclasses.field(default_factory=list)
