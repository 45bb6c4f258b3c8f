"""The computation's host process on a Dask worker, and the job runners it forks.

A Dask worker cannot interrupt a task's thread, so dispynb's jobs never run in it.
`ComputationPlugin` (``_daskworker``) starts this program once per worker and
computation (``python -m dispynb.backends._daskhost FD``). Over the control socket
``FD`` it:

1. receives ``load``: enters the computation's directory, writes the ``depends``
   files, unpickles the bundle, adds dispy's names to the computation's globals and
   runs ``setup(*setup_args)`` (so setup runs once per worker, as once per node);
2. receives ``fork``: forks a runner, which inherits setup's globals (as dispynb's
   node workers do), and passes the runner's end of a fresh socket pair back over the
   control socket (``SCM_RIGHTS``). The worker's task thread then talks to the runner
   directly; killing the runner is how a running job is stopped;
3. receives ``close`` or sees EOF (the worker is gone): kills its runners, runs
   ``cleanup(*setup_args)`` and exits.

A runner runs one job at a time: the payload comes in (its buffers raw after their
sizes, `dispynb.backends._daskpipe`), it calls the function with
``sys.stdout``/``sys.stderr`` captured, and sends back ``done`` (or ``provisional``
results, and files sent with ``dispy_send_file``, while the job runs). A program
computation's function is a `dispynb.programs.ProgramRunner`: the program runs as a
subprocess in the runner's process group (so Stop kills it with the runner).
Messages are pickles framed by
`multiprocessing.connection.Connection`; both ends belong to the same user on the
same machine, started by the worker itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import pickle
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from dispynb.backends._daskpipe import recv_buffers, send_buffers
from dispynb.jobenv import (
    ANSWER_SLICE,
    FROM_AN_ENDED_JOB,
    JOB_ENDED,
    CappedOutput,
    JobStreams,
    JobThreads,
    describe_failure,
    file_sent,
    format_job_exception,
    implicit_modules,
    inject_names,
    limit_memory,
    name_for_client,
    node_logger,
    refused_shutdown,
    send_file_timeout,
    setup_failure,
    unconfirmed,
)
from dispynb.programs import ProgramOutput, ProgramRunner, install_program
from dispynb.protocol import serialize
from dispynb.protocol.framing import Buffer

_PR_SET_PDEATHSIG = 1

#: First item of the worker's message to a runner with the client's answer about
#: a file its job sent: ``(FILE_ANSWER, request, error)`` (`_daskworker.answer_file`).
FILE_ANSWER = "file-answer"


class _Job:
    """The job a runner is running: where its provisional results go."""

    conn: Connection | None = None
    lock = threading.Lock()  # a job's threads may send too
    max_file: int | None = None  # bytes a file sent by a job may have
    pid = 0  # the runner's: a process the job forks reads no answers
    #: Held by a thread waiting for the client's answer to a file: one reader.
    answer_lock = threading.Lock()
    requests = itertools.count(1)
    #: Which job the threads jobs started belong to: one a job left running
    #: sends nothing as the next job.
    threads = JobThreads()
    #: The runner's sys.stdout and sys.stderr while a job runs, the same for all
    #: its jobs: a stream a job kept (its log handler's) writes into the running
    #: job's output.
    streams = JobStreams(threads)


def dispy_provisional_result(
    result: Any, relay: bool = False, timeout: Any = None
) -> int:
    """Send ``result`` to the client now, as a provisional result of this job.

    Returns 0, or -1 if it could not be sent. ``relay`` and ``timeout`` are accepted
    for dispy compatibility.
    """
    conn = _Job.conn
    if conn is None:
        return -1
    if not _Job.threads.of_this_job():
        print(f"provisional result not sent: {FROM_AN_ENDED_JOB}", file=sys.__stderr__)
        return -1
    try:
        data = pickle.dumps(("provisional", serialize.dumps(result)), protocol=5)
        with _Job.lock:
            conn.send_bytes(data)
    except Exception as exc:
        print(f"provisional result not sent: {exc}", file=sys.__stderr__)
        return -1
    return 0


def dispy_send_file(path: str, relay: bool = False, timeout: Any = None) -> int:
    """Send a file to the client, which saves it at the same relative path in its
    folder for received files (its working directory by default).

    ``path`` is relative to the job's directory (or absolute, inside it; a file
    elsewhere is sent under its base name). Returns 0 once the client wrote the
    file, -1 if it did not (too large, unreadable, the client's disk full or its
    folder not writable; the reason is printed on the job's stderr). ``timeout``:
    seconds to wait for the client's answer (None, the default, waits for it: a
    client that goes away cancels the job); ``relay`` is accepted for dispy
    compatibility. Called in a process the job started, it sends the file and
    returns 0 without the client's answer, which only the job's own process reads.
    """
    conn = _Job.conn
    try:
        if conn is None:
            raise OSError("no job is running")
        if not _Job.threads.of_this_job():
            raise OSError(FROM_AN_ENDED_JOB)
        seconds = send_file_timeout(timeout)
        name = name_for_client(path)
        limit = _Job.max_file
        with open(path, "rb") as handle:
            data = handle.read(-1 if limit is None else limit + 1)
        if limit is not None and len(data) > limit:
            raise OSError(
                f"it has over {limit} bytes, the most a job on the Dask engine may "
                "send (files travel through the Dask scheduler): return the data in "
                "the result, or write it to storage the client reads"
            )
        error = _send_file(conn, name, data, seconds)
    except (OSError, ValueError) as exc:
        error = str(exc)
    return file_sent(path, error)


def _send_file(
    conn: Connection, name: str, data: bytes, timeout: float | None
) -> str | None:
    """Send a file and wait for the client's answer (`dispy_send_file`): "" once
    it wrote the file, else why not; None from a process the job started."""
    if os.getpid() != _Job.pid:
        with _Job.lock:
            conn.send_bytes(pickle.dumps(("file", name, data, 0), protocol=5))
        return None
    with _Job.answer_lock:
        # The runner reads its socket again once the job has returned (after
        # taking this lock): a thread the job left must not read it too.
        if _Job.conn is not conn:
            raise OSError("no job is running")
        request = next(_Job.requests)
        with _Job.lock:
            conn.send_bytes(pickle.dumps(("file", name, data, request), protocol=5))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if _Job.conn is not conn:  # its job returned while this thread waited
                return JOB_ENDED
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return unconfirmed(timeout)
            if not conn.poll(ANSWER_SLICE if left is None else min(left, ANSWER_SLICE)):
                continue
            try:
                answer = pickle.loads(conn.recv_bytes())
            except EOFError:
                return "the Dask worker stopped before the client answered"
            if answer[0] == FILE_ANSWER and answer[1] == request:
                return str(answer[2])
            # else a late answer to a call that stopped waiting


def dispy_names(node_name: str, node_ip: str, job_path: str) -> dict[str, Any]:
    """The names dispy computations expect in their globals."""
    names: dict[str, Any] = {
        "dispy_node_name": node_name,
        "dispy_node_ip_addr": node_ip,
        "dispy_job_path": job_path,
        "dispy_provisional_result": dispy_provisional_result,
        "dispy_send_file": dispy_send_file,
        "dispynode_logger": node_logger(),
        "dispynode_shutdown": refused_shutdown("a Dask worker"),
    }
    names.update(implicit_modules())
    return names


def run_one(
    func: Callable[..., Any],
    buffers: list[Buffer],
    conn: Connection,
    max_output: int | None,
    mem_limit: int | None = None,
) -> tuple[tuple[Any, ...], list[Any]]:
    """Run one job (under ``mem_limit``, which the caller set); return ``(meta,
    result_buffers)``.

    ``meta`` is ``(outcome, start, end, stdout, stderr, exception)`` with outcome
    ``"finished"`` (result in the buffers) or ``"raised"`` (traceback text).
    """
    out, err = CappedOutput("stdout", max_output), CappedOutput("stderr", max_output)
    _Job.threads.begin()
    _Job.streams.begin(out, err)
    result_buffers: list[Any] = []
    program: ProgramOutput | None = None
    outcome, exception = "raised", None
    start = end = time.time()
    _Job.conn = conn
    try:
        try:
            args, kwargs = serialize.loads(buffers)
        except Exception as exc:
            exception = f"arguments cannot be unpickled on the worker: {exc}\n"
        else:
            start = time.time()
            try:
                result = func(*args, **kwargs)
            except BaseException as exc:  # reported to the client, never fatal
                end = time.time()
                exception = describe_failure(func, args, kwargs, exc, mem_limit)
            else:
                end = time.time()
                if type(result) is ProgramOutput:
                    program, result = result, result.returncode
                try:
                    result_buffers = serialize.dumps(result)
                    outcome = "finished"
                except Exception as exc:
                    exception = serialize.unpicklable_result(result, exc)
    finally:
        _Job.threads.end()
        _Job.conn = None
        _Job.streams.end()
    stdout: str | bytes = out.text()
    stderr: str | bytes = err.text()
    if program is not None:  # the program's own output, as bytes (dispy's)
        stdout, stderr = program.stdout, program.stderr
    meta = (outcome, start, end, stdout, stderr, exception)
    return meta, result_buffers


def runner_loop(
    conn: Connection,
    sock: socket.socket,
    func: Callable[..., Any],
    max_output: int | None,
) -> None:
    """A runner: jobs in, outcomes out, until EOF. ``conn`` carries the messages,
    ``sock`` (the same socket) the buffers after them (`_daskpipe`)."""
    _Job.pid = os.getpid()
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
            if message[0] == FILE_ANSWER:
                continue  # to a file whose job stopped waiting (its timeout)
            sizes, mem_limit = message
            buffers: list[Buffer] = list(recv_buffers(sock, sizes))
        except (EOFError, OSError):
            return
        lifted = limit_memory(mem_limit) if mem_limit else None
        try:
            meta, result = run_one(func, buffers, conn, max_output, mem_limit or None)
        finally:
            if lifted is not None:
                resource.setrlimit(resource.RLIMIT_AS, lifted)
        # A thread the job left waiting for a file's answer reads the socket until
        # it sees the job returned: the job's end goes (and with it the next job
        # comes) only after, and this loop is its only reader again.
        with _Job.answer_lock:
            pass
        sizes = [memoryview(buffer).nbytes for buffer in result]
        with _Job.lock:
            conn.send_bytes(pickle.dumps(("done", meta, sizes), protocol=5))
            send_buffers(sock, result)


#: Seconds `Host.exit_status` waits for a runner whose socket closed to end.
EXIT_WAIT = 2.0

#: Exit codes of ended runners a host keeps for `Host.exit_status`.
KEPT_EXITS = 64


class Host:
    """The host process's state: the loaded computation and its runners."""

    def __init__(self, ctrl: socket.socket) -> None:
        self.ctrl = ctrl
        self.conn = Connection(os.dup(ctrl.fileno()))
        self.bundle: dict[str, Any] = {}
        self.runners: set[int] = set()
        #: Exit codes of runners that ended, for `exit_status` (the last ones).
        self.exits: dict[int, int] = {}
        self.max_output: int | None = None

    def serve(self) -> int:
        try:
            while True:
                try:
                    message = pickle.loads(self.conn.recv_bytes())
                except (EOFError, OSError):
                    break  # the worker is gone
                op = message[0]
                if op == "load":
                    self.conn.send_bytes(pickle.dumps(self.load(*message[1:])))
                elif op == "fork":
                    self.fork()
                elif op == "status":
                    status = self.exit_status(message[1])
                    self.conn.send_bytes(pickle.dumps(("status", status)))
                elif op == "close":
                    self.conn.send_bytes(pickle.dumps(("closed", self.close())))
                    return 0
            self.close()
            return 0
        finally:
            self.kill_runners()

    def load(
        self,
        bundle: list[Buffer],
        files: list[tuple[str, bytes]],
        job_dir: str,
        node: tuple[str, str],
        max_output: int | None,
        max_file: int | None = None,
    ) -> tuple[str, ...]:
        _Job.max_file = max_file
        try:
            os.makedirs(job_dir, exist_ok=True)
            os.chdir(job_dir)
            for name, data in files:
                path = os.path.join(job_dir, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as handle:
                    handle.write(data)
            if job_dir not in sys.path:
                sys.path.insert(0, job_dir)  # depends modules import as on a node
            self.bundle = serialize.loads(bundle)
            self.max_output = max_output
            program = self.bundle.get("program")
            if program is not None:
                path = install_program(program["name"], program["data"], job_dir)
                names = {
                    "dispy_node_name": node[0],
                    "dispy_node_ip_addr": node[1],
                    "dispy_job_path": job_dir,
                }
                self.bundle["func"] = ProgramRunner(
                    path, names, lambda: max_output, own_session=False
                )
            functions = [self.bundle["func"], *self._extras()]
            inject_names(functions, dict(self.bundle.get("names") or {}))
            inject_names(functions, dispy_names(node[0], node[1], job_dir))
        except Exception as exc:
            return ("failed", f"the computation cannot be loaded: {exc}", "")
        setup = self.bundle.get("setup")
        if setup is None:
            return ("ok",)
        try:
            outcome = setup(*self.setup_args)
        except BaseException as exc:  # user code: any exit of setup is a failure
            text = f"setup raised {type(exc).__name__}: {exc}"
            return ("failed", text, format_job_exception(exc))
        failure = setup_failure(outcome)
        return ("ok",) if failure is None else ("failed", failure, "")

    def _extras(self) -> list[Any]:
        return [f for f in (self.bundle.get("setup"), self.bundle.get("cleanup")) if f]

    @property
    def setup_args(self) -> tuple[Any, ...]:
        return tuple(self.bundle.get("setup_args") or ())

    def fork(self) -> None:
        ours, theirs = socket.socketpair()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the runner
            code = 0
            try:
                self.ctrl.close()
                self.conn.close()
                ours.close()
                os.setpgid(0, 0)  # Stop kills the job's own subprocesses too
                _die_with_parent()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                conn = Connection(os.dup(theirs.fileno()))
                runner_loop(conn, theirs, self.bundle["func"], self.max_output)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self.runners.add(pid)
        self.conn.send_bytes(pickle.dumps(("forked", pid)))
        socket.send_fds(self.ctrl, [b"F"], [ours.fileno()])
        ours.close()
        self.reap()

    def reap(self) -> None:
        for pid in list(self.runners):
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    continue
                self.exits[pid] = os.waitstatus_to_exitcode(status)
                while len(self.exits) > KEPT_EXITS:  # (runners the worker killed)
                    del self.exits[next(iter(self.exits))]
            self.runners.discard(pid)

    def exit_status(self, pid: int) -> int | None:
        """The exit code of runner ``pid``, whose socket the worker saw close
        (negative: the signal that killed it); None if not known within
        `EXIT_WAIT` seconds."""
        if pid in self.exits:
            return self.exits.pop(pid)
        deadline = time.monotonic() + EXIT_WAIT
        while pid in self.runners:
            self.reap()
            if pid in self.exits:
                return self.exits.pop(pid)
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)
        return None

    def kill_runners(self) -> None:
        for pid in self.runners:
            kill_group(pid)
        for pid in self.runners:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.runners.clear()

    def close(self) -> str | None:
        """Kill the runners, then run cleanup; its error text, or None."""
        self.kill_runners()
        cleanup = self.bundle.get("cleanup")
        if cleanup is None:
            return None
        try:
            cleanup(*self.setup_args)
        except BaseException as exc:
            return f"cleanup raised {type(exc).__name__}: {exc}"
        return None


def kill_group(pid: int) -> None:
    """SIGKILL a runner and the processes its job started (its process group)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """SIGKILL this runner when the host process dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    ctrl = socket.socket(fileno=int(args[0]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a notebook's interrupt is not ours
    return Host(ctrl).serve()


if __name__ == "__main__":
    sys.exit(main())
