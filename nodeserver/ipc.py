"""Messages between the node server, a computation's process and its workers.

Channels (all Unix stream sockets on this machine, framed like the wire protocol but
unsigned: both ends are processes of the node itself)::

    node server  <-- control -->  computation process (runs setup, forks workers)
    node server  <-- worker  -->  each worker process (runs jobs, one at a time)

The computation process passes each new worker's socket to the node server with
SCM_RIGHTS, attached to the `WorkerStarted` message.
"""

from __future__ import annotations

from dispynb.protocol.schema import Message, message


class IpcMessage(Message, family=True):
    """Messages of the node's internal channels."""


# --- node server -> computation process ----------------------------------------


@message("load")
class Load(IpcMessage):
    """Load the computation (buffers: its pickled bundle), run setup, start workers.

    The bundle is a dict with keys ``func``, ``setup``, ``cleanup`` (callable or
    None/bool) and ``setup_args`` (tuple).
    """

    name: str
    workers: int
    node_name: str
    node_address: str
    job_path: str
    max_file_size: int = 0
    #: Characters of stdout and of stderr kept per job (None: all).
    max_output: int | None = None
    #: Bytes of a job's pickled result (None: up to the message size cap).
    max_result: int | None = None
    #: Bytes of a pickled result the node's own max message size leaves room for:
    #: over it, only larger nodes' messages help.
    node_result_room: int = 0
    #: The node's max message size (0: not known, nor the room above).
    node_max_message: int = 0
    #: Tasks (processes and threads) a job's worker may have, via its pids cgroup.
    max_pids: int | None = None
    #: Each job in a new worker process (which exits after it), as dispy.
    fresh_process: bool = False
    #: Directory under which worker pids cgroups are made, as the node server found
    #: it once: "" if it found none (max_pids is then enforced by counting), None if
    #: the computation process must look itself.
    pids_root: str | None = None
    #: The pids cgroup the node server moved the computation process into at its
    #: start, for its first worker (`containment.place_in_new_cgroup`), or None.
    first_cgroup: str | None = None
    #: The node server logs at debug level (``-d``): ``dispynode_logger`` in jobs
    #: too, as dispy's (the node's own logger).
    node_debug: bool = False


@message("shutdown")
class Shutdown(IpcMessage):
    """Stop the workers, run the cleanup function (if any), exit."""


# --- computation process -> node server ----------------------------------------


@message("loaded")
class Loaded(IpcMessage):
    """Setup succeeded; `WorkerStarted` messages follow, one per worker."""

    pid: int


@message("load-failed")
class LoadFailed(IpcMessage):
    """Loading or setup failed; the process exits after sending this."""

    message: str
    traceback: str


@message("worker-started")
class WorkerStarted(IpcMessage):
    """A worker was forked; its socket travels with this message (SCM_RIGHTS), and
    a pidfd of it after the socket if ``pidfd`` (none where pidfd_open fails)."""

    pid: int
    pidfd: bool = False


@message("worker-exited")
class WorkerExited(IpcMessage):
    """A worker ended; ``returncode`` is negative for a signal (as in subprocess)."""

    pid: int
    returncode: int
    #: Why the computation process killed it, if it did (e.g. over max_pids).
    reason: str = ""


# --- node server <-> worker ----------------------------------------------------


@message("run")
class Run(IpcMessage):
    """Run one job; buffers hold the pickled ``(args, kwargs)``.

    ``mem_limit``: bytes of address space the worker may use while the job runs
    (its soft ``RLIMIT_AS``), or None for no limit. ``shared``: instead of buffers,
    the ``[offset, length, ...]`` of each in the memfd sent with this message
    (`nodeserver.sharedbody`). ``ahead``: sent while the worker had another job
    (a `Skip` may follow it); a job sent to an idle worker is its head at the node
    from the start, which never skips a head job (it interrupts it).
    """

    key: int
    attempt: int
    mem_limit: int | None = None
    shared: list[int] | None = None
    ahead: bool = False


@message("interrupt-page")
class InterruptPage(IpcMessage):
    """The worker's interrupt page: a memfd sent with this message (before any
    `Run`) whose first 8 bytes the node sets, before it sends the worker SIGINT, to
    the number of the `Run` whose job it interrupts (the Runs on this channel
    counted from 1). A SIGINT that finds another job running, or none, is not
    for it: the job it was meant for ended just as the node signalled."""


@message("output-files")
class OutputFiles(IpcMessage):
    """The worker's files for its descriptors 1 and 2 (`nodeserver.fdoutput`): two
    descriptors sent with this message, before any `Run`. The node keeps its own, to
    read what a job wrote below Python if the worker dies running it."""


@message("skip")
class Skip(IpcMessage):
    """Do not start job ``key`` (sent ahead to this worker, then cancelled)."""

    key: int


@message("provisional")
class Provisional(IpcMessage):
    """A job sent a provisional result (buffers: the pickled result)."""

    key: int
    attempt: int


@message("send-file")
class SendFile(IpcMessage):
    """A job sends a file to its client (one buffer: the content); the worker
    waits for the `FileAnswer` with its ``request``."""

    key: int
    attempt: int
    path: str
    request: int = 0


@message("file-answer")
class FileAnswer(IpcMessage):
    """Node server -> worker: whether its client wrote the file of `SendFile`
    ``request`` (``error`` empty) or why not."""

    request: int
    error: str = ""


@message("node-shutdown")
class NodeShutdown(IpcMessage):
    """A job or the cleanup function called ``dispynode_shutdown()`` (the node stops
    only if it runs with ``--client_shutdown``)."""


@message("done")
class Done(IpcMessage):
    """A job ended: ``finished`` (buffers: pickled result) or ``raised``."""

    key: int
    attempt: int
    outcome: str
    start_time: float
    end_time: float
    stdout: str | bytes  # bytes for program computations, as in dispy
    stderr: str | bytes
    exception: str | bytes | None = None
    #: One letter per out-of-band result buffer (see `serialize.dumps`), or "";
    #: also when a shared-memory reference is sent in the buffers' place.
    kinds: str = ""
    #: The job's arguments came in a shared body that the worker still maps (an
    #: object made from it without a copy lives on): the node must not reuse it.
    kept: bool = False
    #: Which of stdout, stderr and exception are text sent as its UTF-8 bytes
    #: (large ones, `jobrunner.ENCODE_FROM`): "o", "e", "x" for each. The node
    #: keeps and forwards them so (`dispynb.protocol.records.Utf8Text`), never
    #: decoded; other bytes are a program's output.
    utf8: str = ""
    #: Which of those (letters of ``utf8``, in its order) came as the last payload
    #: buffers, after the result's, their fields here empty: the node keeps them
    #: as views of the message it read. Unpacked from the header, each was a copy:
    #: the node held a job's large output twice.
    after: str = ""
