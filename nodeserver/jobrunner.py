"""Running one job in a worker process: unpickle, call, capture, pickle, report.

`run_job` is the whole per-job path and does no I/O of its own, so it is tested in
process; `worker_loop` feeds it from the worker's socket. This path runs thousands of
times a second for trivial jobs: it imports nothing and allocates little per job.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import itertools
import logging
import mmap
import os
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

from dispynb.errors import ConnectionClosedError
from dispynb.jobenv import (
    describe_failure,
    limit_memory,
    node_interrupt,
    output_limit,
    with_dropped_note,
)
from dispynb.protocol import serialize, shm
from dispynb.protocol.framing import Buffer, large_frames_taken, release_spares
from dispynb.protocol.messages import CANCELLED, FINISHED, RAISED
from nodeserver.channel import MessageSocket
from nodeserver.containment import end_leftovers
from nodeserver.fdoutput import FdMerged, FdOutput
from nodeserver.ipc import (
    Done,
    FileAnswer,
    InterruptPage,
    IpcMessage,
    OutputFiles,
    Run,
    Skip,
)
from nodeserver.jobapi import CONTEXT
from nodeserver.jobreasons import CHANNEL_LOST_STATUS
from nodeserver.jobsigint import (
    install_interrupt_handler,
    map_interrupt_page,
    restore_interrupt_handler,
)
from nodeserver.memory import release_freed_memory
from nodeserver.program import ProgramOutput
from nodeserver.sharedbody import MAPPINGS, map_segments, seal, unmap

logger = logging.getLogger(__name__)

_NO_BUFFERS: list[Buffer] = []

#: Characters of a job's stdout, stderr or traceback from which it goes to the node
#: as its UTF-8 bytes (`Done.utf8`), which the node keeps and forwards without
#: decoding: as a str there, text of 4 M emoji took 16 MiB, and as much again
#: encoded to be sent (a node grew 6 times the size of its jobs' output).
ENCODE_FROM = 1 << 14

#: Seconds a job must have run for the worker to look for processes it left: no
#: process can be started (fork, vfork and exec, posix_spawn) in less.
LEFTOVER_CHECK_AFTER = 50e-6

#: Seconds a job, with its arguments and result, must have taken for the worker to
#: give the memory it freed back once idle: moving or making megabytes takes longer,
#: and trivial jobs never pay for the check.
RELEASE_CHECK_AFTER = 1e-3
#: Seconds without a next job after which such a worker gives its freed memory back
#: (`release_freed_memory`) and unmaps the node's bodies it kept: jobs back to back
#: keep reusing them. As long as the node server keeps its bodies (it lets them go
#: after `nodeserver.cli.MEMORY_RELEASE_INTERVAL` without a large message): a kept
#: mapping of a body the node still holds costs no memory, only its page table, and
#: remapping it costs a page fault per 16 pages, refilling the freed heap one per
#: page. At 0.5 s, jobs of large arguments coming in bursts a second apart (the
#: cross-host W4 benchmark, each repetition followed by the raw TCP one) paid both
#: at every burst: about a third of a worker's CPU per MB (perf, 2026-12-04).
RELEASE_AFTER_IDLE = 2.0


def run_job(
    func: Callable[..., Any],
    run: Run,
    buffers: list[memoryview],
    loaded: Callable[[], object] | None = None,
) -> tuple[Done, list[Buffer]]:
    """Call ``func`` on the pickled ``(args, kwargs)`` in ``buffers``; report how.

    Parameters
    ----------
    func:
        The computation's function.
    run:
        The `Run` message; its key and attempt are echoed in the `Done`.
    buffers:
        The payload of ``run``: ``serialize.dumps((args, kwargs))``.
    loaded:
        Called once the arguments are unpickled, before the job starts.

    Returns
    -------
    done, result_buffers
        ``done.outcome`` is ``FINISHED`` (``result_buffers`` hold the pickled result)
        or ``RAISED`` (``done.exception`` holds the traceback text and
        ``result_buffers`` is empty). ``sys.stdout`` and ``sys.stderr`` are captured
        for the job into ``done.stdout`` / ``done.stderr`` and restored afterwards,
        by the worker's `dispynb.jobenv.JobStreams`: the same objects for every
        job, so a stream an earlier job kept (its log handler's) writes into this
        job's output; what a thread an earlier job left running writes meanwhile
        goes to the worker's own streams.

    Notes
    -----
    Every exception of the job is reported, ``SystemExit`` and ``KeyboardInterrupt``
    included: a job must not end its worker. Arguments that cannot be unpickled and a
    result that cannot be pickled are reported as ``RAISED`` too.
    """
    program_output: ProgramOutput | None = None
    bounded = CONTEXT.max_output is not None
    below = CONTEXT.below
    if below is not None:  # the worker's: output below Python joins in order
        if not bounded:
            out: io.StringIO = _Merged()
            err: io.StringIO = _Merged()
        else:
            out, err = _MergedStdout(), _MergedStderr()
        below.begin(out, err)  # type: ignore[arg-type]
    elif not bounded:
        out, err = io.StringIO(), io.StringIO()
    else:
        out, err = _Stdout(), _Stderr()
    streams = CONTEXT.streams
    streams.begin(out, err)
    outcome = RAISED
    exception = None
    result_buffers = _NO_BUFFERS
    kinds: list[str] = []
    via_memory = False  # the arguments came through shared memory: so may the result
    try:
        try:
            if shm.is_reference(buffers):  # the client's memory, copied out here
                via_memory = True
                payload = shm.load_reference(buffers[0], serialize.loads)
            else:
                payload = serialize.loads(buffers)
            args, kwargs, names = _unpack_payload(payload)
        except Exception as exc:
            start_time = end_time = time.time()
            exception = _describe(exc, "arguments cannot be unpickled on the node")
        else:
            if loaded is not None:
                loaded()
            start_time = time.time()
            restore = _add_names(func, names) if names else None
            mem_limit = run.mem_limit
            # Only under a limit: no system call per job otherwise.
            lifted = limit_memory(mem_limit) if mem_limit is not None else None
            try:
                CONTEXT.running = True  # a SIGINT from now on raises in here
                # One that came before its code (for this job) takes effect now.
                if CONTEXT.interrupt_for_this_job():
                    raise node_interrupt()
                result = func(*args, **kwargs)
            except BaseException as exc:  # reported to the client, never fatal
                CONTEXT.running = False
                if lifted is not None:
                    resource.setrlimit(resource.RLIMIT_AS, lifted)
                if restore is not None:
                    restore()
                end_time = time.time()
                exception = describe_failure(func, args, kwargs, exc, mem_limit)
            else:
                CONTEXT.running = False
                if lifted is not None:
                    resource.setrlimit(resource.RLIMIT_AS, lifted)
                if restore is not None:
                    restore()
                end_time = time.time()
                if type(result) is ProgramOutput:
                    program_output = result
                    result = result.returncode
                try:
                    result_buffers = serialize.dumps(result, kinds)
                except Exception as exc:
                    exception = serialize.unpicklable_result(result, exc)
                else:
                    cap = CONTEXT.max_result
                    # One buffer (the usual small result): one len() to check.
                    if cap is not None and (
                        len(result_buffers) > 1 or len(result_buffers[0]) > cap
                    ):
                        exception = _too_large(result_buffers, cap)
                    if exception is None:
                        outcome = FINISHED
                        if via_memory:
                            result_buffers = _to_shared_memory(result_buffers)
                    else:
                        result_buffers = _NO_BUFFERS
    finally:
        streams.end()
    if below is not None:
        # Every job, however short: one of microseconds can os.write or printf, and
        # what it left in the files would be the next job's (a few us per job).
        below.end(out, err)  # type: ignore[arg-type]
        if below.lost:
            # The job closed the files: what later jobs write below Python goes
            # to the node's descriptors, as where none could be made.
            CONTEXT.below = None
            below.close()
    stdout: str | bytes
    stderr: str | bytes
    if program_output is not None:
        stdout, stderr = program_output.stdout, program_output.stderr
    elif bounded:  # may need the line saying how much was dropped
        stdout, stderr = _text(out), _text(err)
    else:
        stdout, stderr = out.getvalue(), err.getvalue()
    traceback: str | bytes | None = None
    if exception is not None:
        traceback = CONTEXT.bounded(exception)
    utf8 = ""
    if (
        len(stdout) >= ENCODE_FROM
        or len(stderr) >= ENCODE_FROM
        or (traceback is not None and len(traceback) >= ENCODE_FROM)
    ):
        stdout, stderr, traceback, utf8 = _large_as_utf8(stdout, stderr, traceback)
    done = Done(
        key=run.key,
        attempt=run.attempt,
        outcome=outcome,
        start_time=start_time,
        end_time=end_time,
        stdout=stdout,
        stderr=stderr,
        exception=traceback,
        kinds="".join(kinds) if outcome == FINISHED else "",
        utf8=utf8,
    )
    return done, result_buffers


def _large_as_utf8(
    stdout: str | bytes, stderr: str | bytes, exception: str | bytes | None
) -> tuple[str | bytes, str | bytes, str | bytes | None, str]:
    """A job's output and traceback, those of `ENCODE_FROM` characters or more as
    their UTF-8 bytes (a program's output is bytes already), and which those are
    (`Done.utf8`). A lone surrogate (a file name decoded with ``os.fsdecode``) is
    written as its escape, ``\\udcff``."""
    texts: list[str | bytes | None] = [stdout, stderr, exception]
    utf8 = ""
    for index, letter in enumerate("oex"):
        text = texts[index]
        if isinstance(text, str) and len(text) >= ENCODE_FROM:
            texts[index] = text.encode("utf-8", "backslashreplace")
            utf8 += letter
    return texts[0], texts[1], texts[2], utf8  # type: ignore[return-value]


def _texts_after(done: Done, buffers: list[Buffer]) -> tuple[Done, list[Buffer]]:
    """``done`` with its texts sent as UTF-8 bytes (`Done.utf8`) moved after the
    result's ``buffers`` (`Done.after`), where the node reads them without a copy."""
    texts: list[Any] = [done.stdout, done.stderr, done.exception]
    after = []
    for index, letter in enumerate("oex"):
        if letter in done.utf8:
            after.append(texts[index])
            texts[index] = b""
    done = dataclasses.replace(
        done, stdout=texts[0], stderr=texts[1], exception=texts[2], after=done.utf8
    )
    return done, [*buffers, *after]


def _encodable(done: Done) -> Done:
    """``done`` whose texts hold a lone surrogate (a file name decoded with
    ``os.fsdecode``, printed), which UTF-8 cannot encode: the surrogate written as
    its escape, as Python's own stderr writes it. Such a job killed its worker,
    its output lost."""

    def escaped(text: str | bytes | None) -> str | bytes | None:
        if not isinstance(text, str):
            return text
        return text.encode("utf-8", "backslashreplace").decode("utf-8")

    return dataclasses.replace(
        done,
        stdout=escaped(done.stdout),  # type: ignore[arg-type]
        stderr=escaped(done.stderr),  # type: ignore[arg-type]
        exception=escaped(done.exception),
    )


def _unpack_payload(
    payload: Any,
) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any] | None]:
    """``(args, kwargs)`` or ``(args, kwargs, names)`` (a job's own dependencies)."""
    if type(payload) is tuple and len(payload) in (2, 3):
        args, kwargs = payload[0], payload[1]
        names = payload[2] if len(payload) == 3 else None
        if (
            type(args) is tuple
            and type(kwargs) is dict
            and type(names) in (dict, type(None))
        ):
            return args, kwargs, names
    raise TypeError("the job payload is not (args, kwargs[, names])")


def _to_shared_memory(buffers: list[Buffer]) -> list[Buffer]:
    """A large result for a client on this machine: written once into shared
    memory, the reference sent instead (the buffers themselves if that fails)."""
    if len(buffers) == 1 and len(buffers[0]) < shm.MIN_SIZE:
        return buffers
    if sum(memoryview(b).nbytes for b in buffers) < shm.MIN_SIZE:
        return buffers
    try:
        prefix = shm.result_prefix(CONTEXT.job_path or os.getcwd())
        _name, reference = shm.write_result(buffers, prefix)
    except OSError:  # /dev/shm full, say: the socket still works
        return buffers
    # The job's kinds still describe the buffers (now in the object): the node
    # keeps them with the copy it keeps for a crashed client (`nodeserver.keeper`).
    return [reference]


def _add_names(func: Callable[..., Any], names: dict[str, Any]) -> Callable[[], None]:
    """Put a job's own dependencies in the computation's globals, for this job only."""
    namespace = getattr(func, "__globals__", None)
    if not isinstance(namespace, dict):
        return lambda: None
    missing = object()
    saved = {name: namespace.get(name, missing) for name in names}
    namespace.update(names)
    # The job's own functions come in their own pickle, with their own globals: give
    # them the names dispy computations expect (dispy_node_name, os, ...) too.
    for value in names.values():
        extra = getattr(value, "__globals__", None)
        if isinstance(extra, dict) and extra is not namespace:
            for name in CONTEXT.names:
                extra.setdefault(name, namespace.get(name, CONTEXT.names[name]))

    def restore() -> None:
        for name, value in saved.items():
            if value is missing:
                namespace.pop(name, None)
            else:
                namespace[name] = value

    return restore


#: A job received: its `Run`, its buffers, the mapping of its shared body (or, if
#: that could not be had, why), and the Run's number on the channel (from 1).
_Inbound = tuple[Run, list[memoryview], mmap.mmap | str | None, int]


def worker_loop(
    sock: MessageSocket, func: Callable[..., Any], once: bool = False
) -> int:
    """Run jobs received on ``sock``, one at a time, until the node server closes it.

    Before starting a job sent ahead (`Run.ahead`), the worker reads what else has
    arrived, so that a `Skip` for it, cancelled meanwhile, stops it from ever
    starting (a Skip for a job not waiting here, started already, is dropped).
    After each job, the processes it left running are killed. A worker
    idle for `RELEASE_AFTER_IDLE` seconds after a large message or a job that took
    `RELEASE_CHECK_AFTER` or more gives the memory it freed or kept for reuse back
    to the system. Returns at EOF, or after the first
    job with ``once`` (``fresh_process``); unexpected messages are logged and ignored.
    Arguments sent as a shared body (``Run.shared``) are unpickled from its mapping,
    which is let go when the job ends (`Done.kept` says if an object still uses it).

    Returns the worker's exit status: 0, or `CHANNEL_LOST_STATUS` if a job closed
    (or replaced) the channel's descriptor.
    """
    send = CONTEXT.send
    begin = CONTEXT.begin
    end = CONTEXT.end
    answer_lock = CONTEXT.answer_lock
    clock = time.perf_counter
    home = os.path.realpath(CONTEXT.job_path) if CONTEXT.job_path else os.getcwd()
    _go_home(home)
    undo_sigint = install_interrupt_handler()
    inbox: collections.deque[_Inbound] = collections.deque()
    skipped: set[int] = set()
    runs = itertools.count(1)  # the number of each Run, as the node counts them
    # What a job waiting for a file's answer reads meanwhile is this loop's.
    CONTEXT.stash = functools.partial(
        _take, sock, inbox=inbox, skipped=skipped, runs=runs
    )
    channel = _identity(sock.fileno())  # a job may close it (see `_identity`)
    release = False  # a job may have left much freed memory behind
    large = large_frames_taken()  # or a large message (whose body is kept for reuse)
    try:
        while True:
            if not inbox:
                # Waiting in `MessageSocket.wait`, not in the read: woken once per
                # job, by the job (not also when the node server reads the result).
                pending = release or MAPPINGS.held or large_frames_taken() != large
                if not sock.wait(RELEASE_AFTER_IDLE if pending else None):
                    MAPPINGS.release()
                    release_spares()
                    release_freed_memory()
                    release, large = False, large_frames_taken()
                    continue
                _take(sock, sock.recv(), inbox, skipped, runs)
                continue
            # Only a job sent ahead can be skipped (the node interrupts a job it
            # sent to an idle worker): one sent to this worker idle starts without
            # a read that would find nothing (a system call per round trip, W2).
            if inbox[0][0].ahead:
                while sock.poll():
                    _take(sock, sock.recv(), inbox, skipped, runs)
            run, buffers, shared, number = inbox.popleft()
            # Once the node interrupted an earlier job here, it wants none of the
            # jobs it sent ahead to start here: it told the worker to skip each,
            # but a Skip may still wait in its buffer behind the arguments of
            # others (a full socket), where the page said so before the signal.
            if run.key in skipped or (run.ahead and CONTEXT.interrupted_before(number)):
                skipped.discard(run.key)
                del buffers
                if isinstance(shared, mmap.mmap):
                    unmap(shared)
                send(_skipped(run), _NO_BUFFERS)
                continue
            begin(sock, run.key, run.attempt, number)
            started = clock()
            if isinstance(shared, str):
                done, result_buffers = _unreadable(run, shared), _NO_BUFFERS
            elif isinstance(shared, mmap.mmap):
                # Arguments that are all copies leave the job nothing to write to
                # the mapping through: then it is kept without looking at its pages.
                loaded = functools.partial(seal, shared, buffers)
                done, result_buffers = run_job(func, run, buffers, loaded)
                del loaded
            else:
                done, result_buffers = run_job(func, run, buffers)
            end()  # the threads it left are its own, not the next job's
            restore_interrupt_handler()  # and so is a SIGINT handler it installed
            del buffers
            if isinstance(shared, mmap.mmap) and not unmap(shared):
                done = dataclasses.replace(done, kept=True)
            del shared
            release = release or clock() - started >= RELEASE_CHECK_AFTER
            # The job's processes end with it. Starting one takes far longer than
            # LEFTOVER_CHECK_AFTER, so the (one system call) check is skipped for
            # the tiny jobs that make up throughput workloads.
            if (
                done.end_time - done.start_time >= LEFTOVER_CHECK_AFTER
                and end_leftovers()
                and CONTEXT.below is not None
            ):
                CONTEXT.below.pass_on()  # what they wrote once the job returned
            if done.utf8:
                done, result_buffers = _texts_after(done, result_buffers)
            try:
                send(done, result_buffers)
            except UnicodeEncodeError:  # raised packing it: nothing was sent
                send(_encodable(done), result_buffers)
            del result_buffers  # do not keep a large result alive until the next job
            # A thread the job left waiting for a file's answer reads the socket
            # until it sees the job returned: this loop reads it only after.
            answer_lock.acquire()
            answer_lock.release()
            if once:
                return 0
            # Workers are reused: a job that changed directory must not move the next
            # (checked once its result is on its way: the next job starts after it).
            _go_home(home)
    except ConnectionClosedError:
        if _identity(sock.fileno()) != channel:
            return CHANNEL_LOST_STATUS  # the node says so (was: "status 0")
        return 0
    finally:
        undo_sigint()  # the process as it was (a rehearsal's)
        MAPPINGS.release()  # the bodies kept for the next jobs: there are none
        below, CONTEXT.below = CONTEXT.below, None
        if below is not None:
            below.close()


def _identity(fd: int) -> tuple[int, int] | None:
    """Which file descriptor ``fd`` is (device and inode), or None if it is
    closed: a job closing descriptors it did not open closes the worker's channel,
    and may open another file under its number."""
    try:
        status = os.fstat(fd)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _go_home(home: str) -> None:
    """Be in the computation's directory ``home`` for the next job, made again if
    it was removed (a /tmp cleaner, an operator, a job): else every job after that
    would kill its worker at ``os.getcwd()``, and so would each new worker."""
    try:
        if os.getcwd() == home:
            return
    except FileNotFoundError:
        pass
    os.makedirs(home, mode=0o700, exist_ok=True)
    os.chdir(home)


def _take(
    sock: MessageSocket,
    received: tuple[IpcMessage, list[memoryview]],
    inbox: collections.deque[_Inbound],
    skipped: set[int],
    runs: Iterator[int],
) -> None:
    message, buffers = received
    if type(message) is Run:
        number = next(runs)
        if message.shared is None:
            inbox.append((message, buffers, None, number))
            return
        fd = sock.take_fd()
        if fd is None:
            reason = "its shared memory did not reach the worker"
            if sock.fds_lost:
                reason += " (the worker could not receive more file descriptors)"
            inbox.append((message, [], reason, number))
            return
        try:
            mapping, views = map_segments(fd, message.shared)
        except (OSError, ValueError) as exc:
            inbox.append((message, [], f"{type(exc).__name__}: {exc}", number))
            return
        inbox.append((message, views, mapping, number))
    elif type(message) is Skip:
        # Only for a job still waiting here: the node sends a job's Run before any
        # Skip for it, so a Skip for one not in the inbox came once it had started
        # (the node could not tell). Kept, it would skip a later run of that key
        # here (the job queued again); dropped, the set holds only waiting jobs.
        key = message.key
        if any(waiting[0].key == key for waiting in inbox):
            skipped.add(key)
    elif type(message) is InterruptPage:
        fd = sock.take_fd()
        if fd is not None:
            CONTEXT.target = map_interrupt_page(fd)
    elif type(message) is OutputFiles:
        out, err = sock.take_fd(), sock.take_fd()
        if out is not None and err is not None and CONTEXT.below is None:
            CONTEXT.below = FdOutput.adopt(out, err)
        else:  # one lost (no room for descriptors), or sent twice
            for fd in (out, err):
                if fd is not None:
                    os.close(fd)
    elif type(message) is not FileAnswer:  # one a job stopped waiting for: late
        logger.warning("worker ignores unexpected %r message", message.op)


def _unreadable(run: Run, reason: str) -> Done:
    """The `Done` of a job whose arguments the worker could not get."""
    reason = f"the job's arguments cannot be read on the node: {reason}\n"
    return _unstarted(run, RAISED, reason)


def _skipped(run: Run) -> Done:
    reason = "job cancelled at the client's request before it started"
    return _unstarted(run, CANCELLED, reason)


def _unstarted(run: Run, outcome: str, reason: str) -> Done:
    """The `Done` of a job that ended before it started."""
    now = time.time()
    return Done(
        key=run.key,
        attempt=run.attempt,
        outcome=outcome,
        start_time=now,
        end_time=now,
        stdout="",
        stderr="",
        exception=reason,
    )


def _describe(exc: Exception, what: str) -> str:
    """``what: <cause>``, naming the underlying error rather than our wrapper."""
    cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
    return f"{what}: {type(cause).__name__}: {cause}\n"


class BoundedOutput(io.StringIO):
    """A job's ``sys.stdout``/``sys.stderr``: keeps the first ``max_output``
    characters, counts the rest (`_text` adds a line saying how much was dropped).

    No ``__init__`` of its own, so that making one per job costs what a StringIO
    does; the counters start as class attributes.
    """

    name = "output"
    kept = 0
    dropped = 0

    @property
    def limit(self) -> int:
        return CONTEXT.max_output or 0

    def write(self, text: str) -> int:
        size = len(text)
        room = self.limit - self.kept
        if size <= room:
            self.kept += size
            return super().write(text)
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if room > 0:
            super().write(text[:room])
            self.kept = self.limit
        self.dropped += size - max(room, 0)
        return size


class _Stdout(BoundedOutput):
    name = "stdout"


class _Stderr(BoundedOutput):
    name = "stderr"


class _Merged(FdMerged, io.StringIO):
    pass


class _MergedStdout(FdMerged, _Stdout):
    pass


class _MergedStderr(FdMerged, _Stderr):
    pass


def _text(capture: io.StringIO) -> str:
    text = capture.getvalue()
    if isinstance(capture, BoundedOutput) and capture.dropped:
        limit = capture.limit
        why = output_limit(limit, CONTEXT.node_max_message)
        return with_dropped_note(text, capture.dropped, capture.name, limit, why)
    return text


def _too_large(buffers: list[Buffer], cap: int) -> str | None:
    """The error text if the pickled result is over ``cap`` bytes: which limit
    it is over, and how to allow more. A larger ``max_result_size`` cannot
    help a result over what the node's own messages take (1 GiB by default)."""
    size = sum(memoryview(b).nbytes for b in buffers)
    if size <= cap:
        return None
    start = (
        f"dispynb.errors.ResultTooLarge: the job's result pickles to {size} bytes, "
        f"over the limit of {cap} bytes"
    )
    less = (
        "return less (write large data to a file and send it with dispy_send_file, "
        "or keep it on the node)"
    )
    if CONTEXT.over_node_room(size):
        # Messages that big leave room for the result besides the job's output.
        larger = 2 * size + max(CONTEXT.node_max_message - CONTEXT.node_result_room, 0)
        return (
            f"{start} (the node's max message size, less room for the job's output): "
            f"{less}, or start the nodes with a larger one, e.g. dispynb-node "
            f"--max-message-size {larger} (LocalCluster(max_message_size=...)), "
            "and give the cluster as large a max_message_size\n"
        )
    return (
        f"{start} (max_result_size): {less}, or give the cluster a larger "
        "max_result_size (within its max_message_size)\n"
    )
