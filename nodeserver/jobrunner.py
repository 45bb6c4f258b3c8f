"""Running one job in a worker process: unpickle, call, capture, pickle, report.

`run_job` is the whole per-job path and does no I/O of its own, so it is tested in
process; `worker_loop` feeds it from the worker's socket. This path runs thousands of
times a second for trivial jobs: it imports nothing and allocates little per job.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from dispynb.errors import ConnectionClosedError
from dispynb.protocol import serialize
from dispynb.protocol.framing import Buffer
from dispynb.protocol.messages import CANCELLED, FINISHED, RAISED
from nodeserver.channel import MessageSocket
from nodeserver.ipc import Done, IpcMessage, Run, Skip
from nodeserver.jobapi import CONTEXT, install_interrupt_handler
from nodeserver.program import ProgramOutput

logger = logging.getLogger(__name__)

_NO_BUFFERS: list[Buffer] = []


def run_job(
    func: Callable[..., Any], run: Run, buffers: list[memoryview]
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

    Returns
    -------
    done, result_buffers
        ``done.outcome`` is ``FINISHED`` (``result_buffers`` hold the pickled result)
        or ``RAISED`` (``done.exception`` holds the traceback text and
        ``result_buffers`` is empty). ``sys.stdout`` and ``sys.stderr`` are captured
        for the job into ``done.stdout`` / ``done.stderr`` and restored afterwards.

    Notes
    -----
    Every exception of the job is reported, ``SystemExit`` and ``KeyboardInterrupt``
    included: a job must not end its worker. Arguments that cannot be unpickled and a
    result that cannot be pickled are reported as ``RAISED`` too.
    """
    saved = sys.stdout, sys.stderr
    program_output: ProgramOutput | None = None
    out = sys.stdout = io.StringIO()
    err = sys.stderr = io.StringIO()
    outcome = RAISED
    exception = None
    result_buffers = _NO_BUFFERS
    try:
        try:
            args, kwargs, names = _unpack_payload(serialize.loads(buffers))
        except Exception as exc:
            start_time = end_time = time.time()
            exception = _describe(exc, "arguments cannot be unpickled on the node")
        else:
            start_time = time.time()
            restore = _add_names(func, names) if names else None
            mem_limit = run.mem_limit
            # Only under a limit: no system call per job otherwise.
            lifted = _limit_memory(mem_limit) if mem_limit is not None else None
            CONTEXT.running = True
            try:
                result = func(*args, **kwargs)
            except BaseException as exc:  # reported to the client, never fatal
                CONTEXT.running = False
                if lifted is not None:
                    resource.setrlimit(resource.RLIMIT_AS, lifted)
                if restore is not None:
                    restore()
                end_time = time.time()
                exception = _format_job_exception(exc)
                if mem_limit is not None and isinstance(exc, MemoryError):
                    exception += _mem_limit_hint(mem_limit)
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
                    result_buffers = serialize.dumps(result)
                except Exception as exc:
                    kind = type(result).__qualname__
                    what = f"result of type {kind!r} cannot be pickled"
                    exception = _describe(exc, what)
                else:
                    outcome = FINISHED
    finally:
        sys.stdout, sys.stderr = saved
    done = Done(
        key=run.key,
        attempt=run.attempt,
        outcome=outcome,
        start_time=start_time,
        end_time=end_time,
        stdout=out.getvalue() if program_output is None else program_output.stdout,
        stderr=err.getvalue() if program_output is None else program_output.stderr,
        exception=exception,
    )
    return done, result_buffers


def _limit_memory(mem_limit: int) -> tuple[int, int]:
    """Lower the soft ``RLIMIT_AS`` to ``mem_limit`` for one job; the limits to restore.

    Only the soft limit changes, so the worker (reused for the next job) can raise it
    again; a hard limit below ``mem_limit`` stays in force.
    """
    saved = resource.getrlimit(resource.RLIMIT_AS)
    hard = saved[1]
    soft = mem_limit if hard == resource.RLIM_INFINITY else min(mem_limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return saved


def _mem_limit_hint(mem_limit: int) -> str:
    return (
        f"(the job ran with a mem_limit of {mem_limit} bytes of address space: "
        "mem_limit / dispy_job_mem_limit; give a larger limit, or None for none)\n"
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


def worker_loop(sock: MessageSocket, func: Callable[..., Any]) -> None:
    """Run jobs received on ``sock``, one at a time, until the node server closes it.

    Before starting a job, the worker reads what else has arrived, so that a `Skip`
    for a job sent ahead and then cancelled stops it from ever starting. Returns at
    EOF; unexpected messages are logged and ignored.
    """
    send = CONTEXT.send
    begin = CONTEXT.begin
    home = os.getcwd()
    install_interrupt_handler()
    inbox: collections.deque[tuple[Run, list[memoryview]]] = collections.deque()
    skipped: set[int] = set()
    try:
        while True:
            if not inbox:
                _take(sock.recv(), inbox, skipped)
                continue
            while sock.poll():
                _take(sock.recv(), inbox, skipped)
            run, buffers = inbox.popleft()
            if run.key in skipped:
                skipped.discard(run.key)
                send(_skipped(run), _NO_BUFFERS)
                continue
            begin(sock, run.key, run.attempt)
            done, result_buffers = run_job(func, run, buffers)
            del buffers
            # Workers are reused: a job that changed directory must not move the next.
            if os.getcwd() != home:
                os.chdir(home)
            send(done, result_buffers)
            del result_buffers  # do not keep a large result alive until the next job
    except ConnectionClosedError:
        return


def _take(
    received: tuple[IpcMessage, list[memoryview]],
    inbox: collections.deque[tuple[Run, list[memoryview]]],
    skipped: set[int],
) -> None:
    message, buffers = received
    if type(message) is Run:
        inbox.append((message, buffers))
    elif type(message) is Skip:
        skipped.add(message.key)
    else:
        logger.warning("worker ignores unexpected %r message", message.op)


def _skipped(run: Run) -> Done:
    now = time.time()
    return Done(
        key=run.key,
        attempt=run.attempt,
        outcome=CANCELLED,
        start_time=now,
        end_time=now,
        stdout="",
        stderr="",
        exception="job cancelled at the client's request before it started",
    )


def _format_job_exception(exc: BaseException) -> str:
    """Traceback text of the job's exception, without `run_job`'s own frame."""
    tb = exc.__traceback__
    tb = tb.tb_next if tb is not None else None
    if isinstance(exc, SystemExit):
        lines = []
        if tb is not None:
            lines = ["Traceback (most recent call last):\n", *traceback.format_tb(tb)]
        lines.append(f"SystemExit: the job called sys.exit({exc.code!r})\n")
        return "".join(lines)
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _describe(exc: Exception, what: str) -> str:
    """``what: <cause>``, naming the underlying error rather than our wrapper."""
    cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
    return f"{what}: {type(cause).__name__}: {cause}\n"
