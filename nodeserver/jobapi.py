"""What a running job can call on the node: dispy's ``dispy_provisional_result``,
``dispy_send_file`` and ``dispynode_logger``.

The functions here are injected into the computation's globals under dispy's names.
They talk to the node server over the worker's own socket, through the `JobContext`
that the worker loop sets for the job it is running.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from dispynb.errors import DispynbError
from dispynb.jobenv import (
    ANSWER_SLICE,
    FROM_AN_ENDED_JOB,
    JOB_ENDED,
    JobStreams,
    JobThreads,
    file_sent,
    output_limit,
    send_file_timeout,
    unconfirmed,
)
from dispynb.protocol import serialize
from nodeserver.channel import MessageSocket
from nodeserver.fdoutput import FdOutput
from nodeserver.ipc import FileAnswer, IpcMessage, NodeShutdown, Provisional, SendFile

logger = logging.getLogger(__name__)


class JobContext:
    """The job a worker is running, and the socket its messages go out on."""

    def __init__(self) -> None:
        self.sock: MessageSocket | None = None
        self.pid = 0  # the worker's: a process a job forks reads no answers
        self.key = 0
        self.attempt = 0
        self.running = False  # True only while user code of a job runs
        #: The number of the job's `Run` on the worker's channel (counted from 1).
        self.run = 0
        #: The node's interrupt page (`nodeserver.ipc.InterruptPage`): the number
        #: of the Run whose job its SIGINT is for. None until the node sent it.
        self.target: memoryview | None = None
        self.job_path = ""
        self.max_file_size = 0
        #: Characters of stdout, stderr and a traceback kept (None: all).
        self.max_output: int | None = None
        self.max_result: int | None = None  # bytes of a pickled result
        #: Of those, what the node's own max message size allows.
        self.node_result_room = 0
        self.node_max_message = 0  # the node's max message size (0: not known)
        self.names: dict[str, Any] = {}  # dispy's names, for a job's own functions
        #: Which job the threads that jobs started belong to.
        self.threads = JobThreads()
        #: The worker's sys.stdout and sys.stderr while a job runs (`run_job`).
        self.streams = JobStreams(self.threads)
        #: The worker's descriptors 1 and 2 while a job runs (`worker_loop` sets
        #: it): what the job writes below Python joins its output.
        self.below: FdOutput | None = None
        self.lock = threading.Lock()  # a job's threads may send too
        #: Held by a thread waiting for its client's answer to a file (`send_file`):
        #: one reader of the socket at a time.
        self.answer_lock = threading.Lock()
        self._requests = itertools.count(1)
        #: ``stash(received)``: a message the worker loop would have read (a job
        #: sent ahead, a skip) that a thread waiting for a file's answer read first.
        self.stash: Callable[[tuple[IpcMessage, list[Any]]], None] | None = None

    def bounded(self, text: str, what: str = "traceback") -> str:
        """``text`` (a traceback, a setup's error) kept to `max_output` characters,
        as a job's output is, with a last line saying how much was dropped: an
        exception with a message of 300 MB reached the node server, and its client,
        whole."""
        limit = self.max_output
        if limit is None or len(text) <= limit:
            return text
        return (
            f"{text[:limit]}\n[dispynb: {len(text) - limit} more characters of the "
            f"{what} dropped: a job keeps {limit} "
            f"({output_limit(limit, self.node_max_message)})]\n"
        )

    def over_node_room(self, size: int) -> bool:
        """Whether a result of ``size`` bytes is over what the node's own max
        message size leaves room for (then a larger max_result_size cannot
        help); 0 bytes of room if the job's output takes it all."""
        return bool(self.node_max_message) and size > self.node_result_room

    def begin(self, sock: MessageSocket, key: int, attempt: int, run: int = 0) -> None:
        """A job starts on this worker (``run``: the number of its `Run`)."""
        self.sock, self.key, self.attempt, self.run = sock, key, attempt, run
        self.pid = os.getpid()
        self.threads.begin()

    def end(self) -> None:
        """The job begun (`begin`) returned: the threads it started are its own."""
        self.threads.end()

    def sent_by_its_job(self) -> bool:
        """Whether the calling thread is the running job's: not one an earlier job
        started, running on once that job returned (`JobThreads`)."""
        return self.running and self.threads.of_this_job()

    def interrupt_for_this_job(self) -> bool:
        """Whether the node interrupted the job begun (`begin`): its SIGINT, sent
        once it set its page, may have come before the job's code ran."""
        target = self.target
        return target is not None and target[0] == self.run

    def interrupted_before(self, run: int) -> bool:
        """Whether the node interrupted a job of this worker before the one of Run
        number ``run``: then it wants no job it sent ahead started here (each told
        to skip, to run elsewhere; the worker is replaced once idle). A kill the
        node sends a job deaf to SIGINT is thus the interrupted job's or an idle
        worker's, never that of a job started as the interrupted one ended."""
        target = self.target
        return target is not None and 0 < target[0] < run

    def send(self, message: Any, buffers: list[Any]) -> None:
        """Send a message for the current job (thread-safe)."""
        if self.sock is None:
            raise RuntimeError("no job is running in this process")
        with self.lock:
            self.sock.send(message, buffers)

    def send_file(self, path: str, data: bytes, timeout: float | None) -> str | None:
        """Send a file for the current job and wait for the client's answer: ""
        once it wrote the file, else why it did not (or no answer in ``timeout``
        seconds; None waits: the node answers for a client it lost). From a
        process the job started, None: sent, but the answer comes to the worker,
        whose messages that process must not read (jobs sent ahead among them)."""
        sock = self.sock
        if sock is None:
            raise RuntimeError("no job is running in this process")
        if os.getpid() != self.pid:
            self.send(SendFile(key=self.key, attempt=self.attempt, path=path), [data])
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.answer_lock:
            # The worker loop reads the socket once its job's code has returned
            # (after taking this lock): a thread the job left must not read too.
            if not self.sent_by_its_job():
                return FROM_AN_ENDED_JOB
            request = next(self._requests)
            message = SendFile(
                key=self.key, attempt=self.attempt, path=path, request=request
            )
            self.send(message, [data])
            while True:
                if not self.running:  # its job returned while this thread waited
                    return JOB_ENDED
                wait = ANSWER_SLICE
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return unconfirmed(timeout)
                    wait = min(left, wait)
                if not sock.wait(wait):
                    continue
                received = sock.recv()
                answer = received[0]
                if type(answer) is FileAnswer:
                    if answer.request == request:
                        return answer.error
                    continue  # a late answer to a call that stopped waiting
                if self.stash is not None:  # for the worker loop, after this job
                    self.stash(received)


#: The context of this worker process (each worker runs one job at a time).
CONTEXT = JobContext()


def dispy_provisional_result(
    result: Any, relay: bool = False, timeout: Any = None
) -> int:
    """Send ``result`` to the client now, as a provisional result of this job.

    The job goes on running; the client sees status ``ProvisionalResult`` and its
    ``job_status`` callback is called. Returns 0, or -1 if it could not be sent (the
    reason is logged). ``relay`` and ``timeout`` are accepted for dispy compatibility.
    """
    try:
        buffers = serialize.dumps(result)
        cap = CONTEXT.max_result  # as for its final result: the client takes no more
        size = sum(memoryview(b).nbytes for b in buffers)
        if cap is not None and size > cap:
            limit = (
                "the node's max message size, less room for the job's output"
                if CONTEXT.over_node_room(size)
                else "max_result_size, within the client's max_message_size"
            )
            raise OSError(
                f"it pickles to {size} bytes, over the limit of {cap} bytes ({limit})"
            )
        if not CONTEXT.sent_by_its_job():
            # The captured stderr (a log handler's too) is the next job's now.
            if sys.__stderr__ is not None:
                print(
                    f"provisional result not sent: {FROM_AN_ENDED_JOB}",
                    file=sys.__stderr__,
                )
            return -1
        CONTEXT.send(Provisional(key=CONTEXT.key, attempt=CONTEXT.attempt), buffers)
    except (DispynbError, RuntimeError, OSError) as exc:
        logger.warning("provisional result not sent: %s", exc)
        return -1
    return 0


def dispy_send_file(path: str, relay: bool = False, timeout: Any = None) -> int:
    """Send a file to the client, which saves it at the same relative path in its
    folder for received files (its working directory by default).

    ``path`` is relative to the job's directory (or absolute, inside it; a file
    elsewhere is sent under its base name). Returns 0 once the client wrote the
    file, -1 if it did not (too large for the node's limit, unreadable, the
    client's disk full or its folder not writable, the client gone; the reason is
    printed on the job's stderr). ``timeout``: seconds to wait for the client's
    answer (None, the default, waits for it); ``relay`` is accepted for dispy
    compatibility. Called in a process the job started (``multiprocessing``), it
    sends the file and returns 0 without the client's answer, which only the job's
    own process can wait for.
    """
    try:
        name = _name_for_client(path)
        with open(path, "rb") as handle:
            data = handle.read()
        if CONTEXT.max_file_size and len(data) > CONTEXT.max_file_size:
            raise OSError(
                f"it has {len(data)} bytes, over the {CONTEXT.max_file_size} "
                "a job may send (the node's --max-file-size, or the client's "
                "max_message_size less a header's room)"
            )
        error = CONTEXT.send_file(name, data, send_file_timeout(timeout))
    except (DispynbError, RuntimeError, OSError, ValueError) as exc:
        error = str(exc)
    return file_sent(path, error)


def dispynode_shutdown() -> int:
    """Ask the node to shut down (dispy's ``dispynode_shutdown``), from a job or from
    the computation's cleanup function.

    The node stops only if it was started with ``--client_shutdown``: then it stops
    as on SIGTERM (no new jobs; running ones, this one included, may finish). Without
    that option any job could stop a shared node, so the node refuses and logs why.
    Returns 0 once the request is sent, -1 if it could not be (logged).
    """
    try:
        CONTEXT.send(NodeShutdown(), [])
    except (DispynbError, RuntimeError, OSError) as exc:
        logger.warning("dispynode_shutdown: request not sent: %s", exc)
        return -1
    return 0


def _name_for_client(path: str) -> str:
    full = os.path.abspath(path)
    base = os.path.realpath(CONTEXT.job_path or os.getcwd())
    if full.startswith(base.rstrip(os.sep) + os.sep):
        return os.path.relpath(full, base).replace(os.sep, "/")
    return os.path.basename(full)
