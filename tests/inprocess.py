"""A real node server inside the test process, on the test's asyncio loop.

`in_process_node` starts a `NodeServer` on 127.0.0.1 (port 0, a secret, no discovery)
whose computations are run by `ThreadLauncher` instead of ``python -m
nodeserver.compute``: everything of the node's asynchronous side (listener,
handshake, `ClientSession`, `Computation`, the control and worker channels with
their SCM_RIGHTS hand-over) is the product's own code; only the computation process
and its workers are threads that speak the same channels (`nodeserver.ipc`).

What the stand-in does, and how it differs from the real computation process
(`nodeserver.compute`, tested with real processes in tests/nodeserver/test_compute):

- it unpickles the bundle, runs ``setup``, answers ``loaded`` and starts one worker
  thread per CPU, each on its own socket pair whose node end travels with
  ``worker-started``; at ``shutdown`` it ends its workers (``worker-exited``, -15),
  runs ``cleanup`` and exits 0; at EOF of the control channel it exits 1;
- a worker runs a job with the same payload and result encoding as
  `nodeserver.jobrunner` (no stdout capture: threads share ``sys.stdout``);
- ``interrupt(pid)`` raises KeyboardInterrupt in that worker's job (as SIGINT does),
  if the worker's interrupt page names it (else the job ignores it, as a real
  worker does; one named before its code starts is raised as it starts),
  ``kill_group(pid)`` ends the worker (its socket closes, ``worker-exited`` -9) and
  starts a replacement, as the computation process does after a SIGKILL.

Worker "pids" are above Linux's ``pid_max``: a signal sent to one by mistake can
reach no process. A blocking test job must wait in small steps (`wait_gate`) so an
interrupt or kill reaches it between two of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import itertools
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from dispynb.defaults import MAX_MESSAGE_SIZE
from dispynb.errors import ConnectionClosedError
from dispynb.protocol import serialize
from dispynb.protocol.messages import FINISHED, RAISED
from dispynb.transport.connection import Connection
from dispynb.transport.connector import connect
from nodeserver.channel import MessageSocket
from nodeserver.config import NodeConfig
from nodeserver.containment import HeldWorker
from nodeserver.ipc import (
    Done,
    InterruptPage,
    Load,
    Loaded,
    LoadFailed,
    Provisional,
    Run,
    SendFile,
    Shutdown,
    Skip,
    WorkerExited,
    WorkerStarted,
)
from nodeserver.jobsigint import map_interrupt_page
from nodeserver.launcher import ComputationProcess
from nodeserver.server import NodeServer
from nodeserver.sharedbody import map_segments

SECRET = b"in-process-node-secret"

#: Seconds any wait of this module may take before the test fails.
WAIT = 10.0

#: Fake worker pids start above the largest pid_max Linux allows (2**22).
_pids = itertools.count(1 << 23)

#: Named gates test jobs wait on (module globals: jobs defined in an importable
#: module are pickled by reference, so a job sees the test's gates).
GATES: dict[str, threading.Event] = {}


def gate(name: str) -> threading.Event:
    """The gate ``name`` (created closed)."""
    return GATES.setdefault(name, threading.Event())


def wait_gate(name: str, timeout: float = 30.0) -> str:
    """A job body: wait (in 5 ms steps) until gate ``name`` opens; return ``name``."""
    event = gate(name)
    deadline = time.monotonic() + timeout
    while not event.wait(0.005):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {name!r} never opened")
    return name


#: The job a stand-in worker thread runs: its channel and `Run`.
_RUNNING = threading.local()


def send_provisional(value: Any) -> None:
    """In a job body: send ``value`` as its provisional result (the stand-in's
    ``dispy_provisional_result``)."""
    run = _RUNNING.run
    message = Provisional(key=run.key, attempt=run.attempt)
    _RUNNING.channel.send(message, serialize.dumps(value))


def send_file(path: str, data: bytes) -> None:
    """In a job body: send ``data`` as file ``path`` to the client, not waiting for
    its answer (the stand-in's ``dispy_send_file``)."""
    run = _RUNNING.run
    message = SendFile(key=run.key, attempt=run.attempt, path=path)
    _RUNNING.channel.send(message, [data])


class _Killed(BaseException):
    """Raised in a worker thread whose worker was killed: ends the thread."""


def _raise_in(thread: threading.Thread | None, exc_type: type[BaseException]) -> None:
    """Raise ``exc_type`` in ``thread`` when it next runs Python code."""
    ident = thread.ident if thread is not None else None
    if ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(ident), ctypes.py_object(exc_type)
        )


@dataclasses.dataclass(eq=False)
class _Worker:
    pid: int
    sock: socket.socket
    thread: threading.Thread | None = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    in_job: bool = False
    dead: bool = False
    jobs_run: int = 0
    #: The node's interrupt page (`nodeserver.ipc.InterruptPage`), and the number
    #: of the Run whose job runs now (the Runs counted from 1, as the node does).
    page: memoryview | None = None
    run: int = 0

    def interrupt_is_for_its_job(self) -> bool:
        """Whether a SIGINT now is for the job it runs (`jobsigint.interrupt_job`)."""
        return self.page is None or self.page[0] == self.run


class ThreadProcess:
    """One stand-in computation process: a control thread and worker threads."""

    def __init__(self, control: socket.socket, cwd: str, launcher: ThreadLauncher):
        self.cwd = cwd
        self.pid = next(_pids)
        self.returncode: int | None = None
        self.workers: dict[int, _Worker] = {}
        self._launcher = launcher
        self._control = MessageSocket(control)
        self._send_lock = threading.Lock()
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._func: Callable[..., Any] | None = None
        self._stopping = False
        self.threads: list[threading.Thread] = []
        self._start_thread(self._serve, f"standin-computation-{self.pid}")

    # -- ComputationProcess --------------------------------------------------------

    async def wait(self) -> int:
        """Wait for the control thread to end; its exit status."""
        return await asyncio.shield(self._exited)

    def kill(self) -> None:
        """As SIGKILL: every worker dies, the control channel closes."""
        self._stopping = True
        for worker in list(self.workers.values()):
            self._end_worker(worker)
        with contextlib.suppress(OSError):
            self._control.sock.shutdown(socket.SHUT_RDWR)

    # -- workers, as the launcher signals them --------------------------------------

    def interrupt(self, worker: _Worker) -> None:
        with worker.lock:
            if worker.in_job and not worker.dead and worker.interrupt_is_for_its_job():
                _raise_in(worker.thread, KeyboardInterrupt)

    def kill_worker(self, worker: _Worker) -> None:
        """The worker dies (SIGKILL); the process reports it and starts another."""
        if worker.dead:
            return
        self._end_worker(worker)
        with contextlib.suppress(ConnectionClosedError, OSError):
            self._send(WorkerExited(pid=worker.pid, returncode=-signal.SIGKILL))
            if not self._stopping:
                self._start_worker()

    def _end_worker(self, worker: _Worker) -> None:
        with worker.lock:
            worker.dead = True
            if worker.in_job:
                _raise_in(worker.thread, _Killed)
        with contextlib.suppress(OSError):
            worker.sock.shutdown(socket.SHUT_RDWR)  # the node reads EOF
        self.workers.pop(worker.pid, None)
        self._launcher.workers.pop(worker.pid, None)

    # -- the control thread ----------------------------------------------------------

    def _serve(self) -> None:
        code = 1
        try:
            code = self._load_and_supervise()
        except (ConnectionClosedError, OSError):
            code = -signal.SIGKILL if self._stopping else 1
        finally:
            self._stopping = True
            for worker in list(self.workers.values()):
                self._end_worker(worker)
            self._control.close()
            self.returncode = code
            with contextlib.suppress(RuntimeError):  # the test's loop ended already
                self._loop.call_soon_threadsafe(self._set_exit, code)

    def _set_exit(self, code: int) -> None:
        if not self._exited.done():
            self._exited.set_result(code)

    def _load_and_supervise(self) -> int:
        message, buffers = self._control.recv()
        assert isinstance(message, Load), message
        try:
            bundle = serialize.loads(buffers)
            self._func = bundle["func"]
            setup = bundle.get("setup")
            setup_args = tuple(bundle.get("setup_args") or ())
            if setup is not None:
                returned = setup(*setup_args)
                if returned not in (None, 0, 1, 2):
                    raise RuntimeError(f"setup returned {returned!r}")
        except Exception as exc:
            self._send(LoadFailed(message=repr(exc), traceback=traceback.format_exc()))
            return 1
        self._send(Loaded(pid=self.pid))
        for _ in range(message.workers):
            self._start_worker()
        while True:
            received, _buffers = self._control.recv()
            if isinstance(received, Shutdown):
                break
        self._stopping = True
        for worker in list(self.workers.values()):
            self._end_worker(worker)
            self._send(WorkerExited(pid=worker.pid, returncode=-signal.SIGTERM))
        cleanup = bundle.get("cleanup")
        if callable(cleanup):
            cleanup(*setup_args)
        return 0

    def _send(self, message: Any, fds: list[int] | None = None) -> None:
        with self._send_lock:
            self._control.send(message, (), fds or ())

    def _start_worker(self) -> None:
        node_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        worker = _Worker(pid=next(_pids), sock=worker_end)
        self.workers[worker.pid] = worker
        self._launcher.workers[worker.pid] = (self, worker)
        try:
            self._send(WorkerStarted(pid=worker.pid), [node_end.fileno()])
        finally:
            node_end.close()  # the node server has its own copy now
        self._start_thread(lambda: self._work(worker), f"standin-worker-{worker.pid}")

    def _start_thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()
        return thread

    # -- a worker thread -------------------------------------------------------------

    def _work(self, worker: _Worker) -> None:
        worker.thread = threading.current_thread()
        channel = MessageSocket(worker.sock, fds=True)
        inbox: list[tuple[Run, list[memoryview], int]] = []
        skipped: set[int] = set()
        runs = itertools.count(1)
        try:
            while not worker.dead:
                if not inbox or channel.poll():
                    message, buffers = channel.recv()
                    if isinstance(message, Run):
                        if message.shared is not None:  # as the real worker does
                            fd = channel.take_fd()
                            assert fd is not None, "a shared body came without its fd"
                            _, buffers = map_segments(fd, message.shared)
                        inbox.append((message, buffers, next(runs)))
                    elif isinstance(message, Skip) and any(
                        run.key == message.key for run, _, _ in inbox
                    ):  # as the real worker: only for a job still waiting here
                        skipped.add(message.key)
                    elif isinstance(message, InterruptPage):
                        fd = channel.take_fd()
                        assert fd is not None, "the interrupt page came without its fd"
                        worker.page = map_interrupt_page(fd)
                    continue
                run, buffers, worker.run = inbox.pop(0)
                if run.key in skipped:
                    skipped.discard(run.key)
                    now = time.time()
                    done = Done(
                        key=run.key,
                        attempt=run.attempt,
                        outcome="cancelled",
                        start_time=now,
                        end_time=now,
                        stdout="",
                        stderr="",
                        exception="job cancelled before it started",
                    )
                    channel.send(done)
                    continue
                _RUNNING.channel, _RUNNING.run = channel, run
                done, result = self._run(worker, run, buffers)
                channel.send(done, result)
                worker.jobs_run += 1  # after the send: its result is in the socket
        except (ConnectionClosedError, OSError, _Killed):
            pass
        finally:
            channel.close()

    def _run(
        self, worker: _Worker, run: Run, buffers: list[memoryview]
    ) -> tuple[Done, list[Any]]:
        assert self._func is not None
        start = time.time()
        outcome, exception = RAISED, None
        result: list[Any] = []
        kinds: list[str] = []
        try:
            payload = serialize.loads(buffers)
            args, kwargs = payload[0], payload[1]
            with worker.lock:
                worker.in_job = True
                named = worker.page is not None and worker.page[0] == worker.run
            try:
                if named:  # interrupted before its code ran: as it starts
                    raise KeyboardInterrupt
                value = self._func(*args, **kwargs)
            finally:
                with worker.lock:
                    worker.in_job = False
            result = serialize.dumps(value, kinds)
            outcome = FINISHED
        except _Killed:
            raise
        except BaseException:  # as a real worker: every exception is the job's
            exception = traceback.format_exc()
        return (
            Done(
                key=run.key,
                attempt=run.attempt,
                outcome=outcome,
                start_time=start,
                end_time=time.time(),
                stdout="",
                stderr="",
                exception=exception,
                kinds="".join(kinds) if outcome == FINISHED else "",
            ),
            result,
        )


class ThreadLauncher:
    """A `nodeserver.launcher.Launcher` whose computation processes are threads."""

    def __init__(self) -> None:
        self.processes: list[ThreadProcess] = []
        self.workers: dict[int, tuple[ThreadProcess, _Worker]] = {}
        self.interrupts: list[int] = []
        self.kills: list[int] = []

    async def start(
        self, control: socket.socket, cwd: str, timeout: float | None = None
    ) -> ComputationProcess:
        process = ThreadProcess(control, cwd, self)
        self.processes.append(process)
        return process

    def interrupt(self, worker: HeldWorker) -> bool:
        self.interrupts.append(worker.pid)
        found = self.workers.get(worker.pid)
        if found is not None:
            found[0].interrupt(found[1])
        return True  # a thread's job cannot ignore it

    def kill_group(self, worker: HeldWorker) -> None:
        self.kills.append(worker.pid)
        self.kill_worker(worker.pid)

    def kill_worker(self, pid: int) -> None:
        """Worker ``pid`` dies (as of SIGKILL)."""
        found = self.workers.get(pid)
        if found is not None:
            found[0].kill_worker(found[1])

    def sweep_orphans(self) -> int:
        return 0  # threads leave no processes

    def busy_workers(self) -> list[int]:
        """Pids of the workers running a job now."""
        return [pid for pid, (_p, w) in list(self.workers.items()) if w.in_job]

    def join(self, timeout: float = WAIT) -> None:
        """Wait for every thread of every stand-in process to end."""
        deadline = time.monotonic() + timeout
        for process in self.processes:
            for thread in list(process.threads):
                thread.join(max(deadline - time.monotonic(), 0.0))
                if thread.is_alive():
                    raise AssertionError(f"stand-in thread {thread.name} did not end")


@dataclasses.dataclass
class InProcessNode:
    """A node server on the test's loop, and its stand-in launcher."""

    server: NodeServer
    launcher: ThreadLauncher
    port: int

    async def client(self, name: str = "test-client") -> Connection:
        """A new authenticated client connection to this node."""
        conn, _welcome = await connect(
            "127.0.0.1",
            self.port,
            secret=SECRET,
            max_message_size=MAX_MESSAGE_SIZE,
            name=name,
        )
        return conn

    def vanish(self) -> None:
        """The node disappears: no more clients, every connection cut at once."""
        self.server.pause()
        for session in list(self.server.sessions):
            session.conn.abort()


@contextlib.asynccontextmanager
async def in_process_node(
    directory: Path, *, cpus: int = 2, name: str = "inproc", **config: Any
) -> AsyncIterator[InProcessNode]:
    """Run an in-process node server (stopped, its threads joined, on exit)."""
    launcher = ThreadLauncher()
    server = NodeServer(
        NodeConfig(
            host="127.0.0.1",
            port=0,
            cpus=cpus,
            name=name,
            secret=SECRET,
            dest_path=os.fspath(directory),
            discovery=False,
            **config,
        ),
        launcher=launcher,
    )
    port = await server.start()
    try:
        yield InProcessNode(server, launcher, port)
    finally:
        await server.stop()
        launcher.join()


async def wait_until(predicate: Callable[[], object], what: str = "") -> None:
    """Wait (yielding to the loop) until ``predicate()`` is true, at most `WAIT` s."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {WAIT} s: {what or predicate}")
        await asyncio.sleep(0.002)
