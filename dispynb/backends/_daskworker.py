"""What runs inside a Dask worker for a dispynb computation.

`ComputationPlugin` is a Dask ``WorkerPlugin``: its ``setup`` starts the
computation's host process (`dispynb.backends._daskhost`, which runs the user's
``setup``) and forks one runner per worker thread; its ``teardown`` runs ``cleanup``.
Its ``transition`` hook sees Dask cancel a task that is executing
(``executing -> released``, what ``Client.cancel`` does on the worker) and kills the
runner of that job: that is how Stop ends running work, which a Dask task thread
alone cannot do.

`run_job` is the Dask task of every dispynb job: it hands the pickled arguments to an
idle runner and waits for the outcome (a small one also goes to the client as a
structured event, so the client need not gather it), passing provisional results
on as Dask structured events (``Worker.log_event`` on the computation's topic; the
client subscribes with ``Client.subscribe_topic``), files the job sends
(``dispy_send_file``) the same way (the client answers each with `answer_file`,
which the job waits for), and announcing the start of jobs that
run longer than `START_REPORT` the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from distributed import WorkerPlugin, get_worker

from dispynb.backends._daskhost import FILE_ANSWER, kill_group
from dispynb.backends._daskpipe import recv_buffers, send_buffers
from dispynb.jobenv import crash_reason, mem_limit_note, timeout_reason

#: Seconds a job runs before its start is announced to the client (quicker jobs
#: report their start with their outcome: one event less on the hot path).
START_REPORT = 0.01

#: Bytes of result, stdout, stderr and traceback up to which a job's outcome is
#: also sent to the client as a structured event (the scheduler keeps the last
#: events of a topic: a bounded size each keeps what it holds small).
PUSH_RESULT = 8 << 10

#: Seconds the host gets to run cleanup and exit at teardown.
CLOSE_WAIT = 30.0

#: Seconds the host may take to say how a runner ended (it waits for that at most
#: `_daskhost.EXIT_WAIT`).
STATUS_WAIT = 30.0


class Runner:
    """One runner process: its pid and its end of the socket pair."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock  # the buffers (`_daskpipe`); ``conn`` the messages
        self.conn = Connection(os.dup(sock.fileno()))
        self.killed = False
        #: Held while writing to it: a job (message and buffers, from a task
        #: thread) and the client's answer about a file (from the loop) never mix.
        self.lock = threading.Lock()

    def kill(self) -> None:
        """SIGKILL the runner and its job's subprocesses (its process group)."""
        self.killed = True
        kill_group(self.pid)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        self.sock.close()


class ComputationPlugin(WorkerPlugin):
    """One dispynb computation on a Dask worker (see the module's docstring)."""

    def __init__(
        self,
        uid: str,
        topic: str,
        bundle: list[bytes],
        files: list[tuple[str, bytes]],
        dest_path: str | None,
        max_output: int | None,
        max_file: int | None = None,
        fresh: bool = False,
    ) -> None:
        self.uid = uid
        self.fresh = fresh  # fresh_process: a runner runs one job, then ends
        self.max_file = max_file
        self.topic = topic
        self.bundle = bundle
        self.files = files
        self.dest_path = dest_path
        self.max_output = max_output
        self.prefix = f"dispynb-{uid}-"

    # -- Dask's hooks (on the worker's event loop) ------------------------------------

    async def setup(self, worker: Any) -> None:
        self.worker = worker
        self.idle: queue.SimpleQueue[Runner] = queue.SimpleQueue()
        self.running: dict[str, Runner] = {}
        self.ctrl_lock = threading.Lock()
        self.error = ""
        self.error_traceback = ""  # setup's, when it raised
        self.host: subprocess.Popen[bytes] | None = None
        await asyncio.to_thread(self._start, worker)
        nthreads = worker.state.nthreads
        ready = ["ready", self.uid, worker.address, nthreads, _node_name(worker)]
        worker.log_event(self.topic, [*ready, self.error, self.error_traceback])

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, **kw: Any
    ) -> None:
        if start in ("executing", "long-running") and finish in (
            "released",
            "cancelled",
        ):
            runner = self.running.get(key) if isinstance(key, str) else None
            if runner is not None:
                runner.kill()  # Stop: the job's process, not the worker

    async def teardown(self, worker: Any) -> None:
        await asyncio.to_thread(self._stop)

    # -- the host process (in threads) ----------------------------------------------

    def _start(self, worker: Any) -> None:
        ours, theirs = socket.socketpair()
        root = self.dest_path or os.path.join(worker.local_directory, "dispynb")
        job_dir = self.job_dir = os.path.join(root, self.uid)
        try:
            self.host = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dispynb.backends._daskhost",
                    str(theirs.fileno()),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's or kernel's ^C is not for it
            )
        finally:
            theirs.close()
        self.ctrl = ours
        self.conn = Connection(os.dup(ours.fileno()))
        host_ip = worker.address.rsplit("//", 1)[-1].rsplit(":", 1)[0]
        node = (_node_name(worker), host_ip)
        self.conn.send_bytes(
            pickle.dumps(
                (
                    "load",
                    self.bundle,
                    self.files,
                    job_dir,
                    node,
                    self.max_output,
                    self.max_file,
                )
            )
        )
        try:
            reply = pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            reply = ("failed", "the computation's process on the worker exited", "")
        if reply[0] != "ok":
            self.error, self.error_traceback = reply[1], reply[2]
            self._stop()
            return
        for _ in range(max(int(worker.state.nthreads), 1)):
            self.idle.put(self._fork())

    def _fork(self) -> Runner:
        with self.ctrl_lock:
            self.conn.send_bytes(pickle.dumps(("fork",)))
            _, pid = pickle.loads(self.conn.recv_bytes())
            _, fds, _, _ = socket.recv_fds(self.ctrl, 1, 1)
        return Runner(pid, socket.socket(fileno=fds[0]))

    def _stop(self) -> None:
        host = self.host
        if host is None:
            return
        self.host = None
        with contextlib.suppress(OSError, EOFError), self.ctrl_lock:
            self.conn.send_bytes(pickle.dumps(("close",)))
            if self.conn.poll(CLOSE_WAIT):
                self.conn.recv_bytes()
        for closing in (self.conn, self.ctrl):
            with contextlib.suppress(OSError):
                closing.close()
        try:
            host.wait(CLOSE_WAIT)
        except subprocess.TimeoutExpired:
            os.killpg(host.pid, signal.SIGKILL)
            host.wait()
        while not self.idle.empty():
            self.idle.get().close()

    # -- one job (in a Dask task thread) --------------------------------------------

    def run(
        self,
        dask_key: str,
        buffers: list[bytes],
        limits: tuple[float | None, int | None],
    ) -> tuple[tuple[Any, ...], list[bytes]]:
        if self.error:
            shown = "\n".join(filter(None, (self.error, self.error_traceback)))
            return ("setup", 0.0, 0.0, "", "", shown), []
        runner = self.idle.get()
        self.running[dask_key] = runner
        try:
            task = self.worker.state.tasks.get(dask_key)
            if task is not None and task.state == "cancelled":
                return ("cancelled", 0.0, 0.0, "", "", None), []
            return self._exchange(runner, dask_key, buffers, limits)
        finally:
            del self.running[dask_key]
            if self.fresh and not runner.killed:
                runner.kill()  # with what the job left running, as on nodes
            if runner.killed or runner.conn.closed:
                runner.close()
                if self.host is not None:  # else: the computation is closing
                    self.idle.put(self._fork())
            else:
                self.idle.put(runner)

    def _exchange(
        self,
        runner: Runner,
        dask_key: str,
        buffers: list[bytes],
        limits: tuple[float | None, int | None],
    ) -> tuple[tuple[Any, ...], list[bytes]]:
        conn = runner.conn
        timeout, mem_limit = limits
        started = time.time()
        announced = False
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            sizes = [memoryview(buffer).nbytes for buffer in buffers]
            with runner.lock:
                conn.send_bytes(pickle.dumps((sizes, mem_limit)))
                send_buffers(runner.sock, buffers)
            while True:
                wait = START_REPORT if not announced else 1.0
                if deadline is not None:
                    wait = min(wait, max(deadline - time.monotonic(), 0.0))
                if not conn.poll(wait):
                    if (
                        timeout is not None
                        and deadline is not None
                        and time.monotonic() >= deadline
                    ):
                        runner.kill()
                        text = timeout_reason(timeout) + "\n"
                        return ("timeout", started, time.time(), "", "", text), []
                    if not announced:
                        announced = True
                        self.worker.log_event(
                            self.topic,
                            ["start", dask_key, self.worker.address, started],
                        )
                    continue
                message = pickle.loads(conn.recv_bytes())
                if message[0] == "provisional":
                    data = pickle.dumps([bytes(b) for b in message[1]], protocol=5)
                    event = ["provisional", dask_key, self.worker.address, data]
                    self.worker.log_event(self.topic, event)
                    continue
                if message[0] == "file":  # before the result, on the same stream
                    # The client answers a request (not 0) with `answer_file`.
                    _, name, data, request = message
                    address = self.worker.address
                    event = ["file", dask_key, name, data, address, request]
                    self.worker.log_event(self.topic, event)
                    continue
                _, meta, sizes = message
                return meta, recv_buffers(runner.sock, sizes)
        except (EOFError, OSError):
            runner.kill()  # dead already, or half-way: a fresh one replaces it
            if self._cancelled(dask_key):
                return ("terminated", started, time.time(), "", "", None), []
            code = self._exit_status(runner.pid)
            text = (
                "the job's process on the Dask worker died (killed or crashed)\n"
                if code is None
                else crash_reason(code) + mem_limit_note(mem_limit) + "\n"
            )
            return ("crashed", started, time.time(), "", "", text), []

    def _exit_status(self, pid: int) -> int | None:
        """How the runner ``pid`` ended (its exit code), as its host process saw
        it; None if the host does not say within `STATUS_WAIT` seconds."""
        with contextlib.suppress(OSError, EOFError), self.ctrl_lock:
            self.conn.send_bytes(pickle.dumps(("status", pid)))
            if self.conn.poll(STATUS_WAIT):
                status = pickle.loads(self.conn.recv_bytes())[1]
                return None if status is None else int(status)
        return None

    def _cancelled(self, dask_key: str) -> bool:
        task = self.worker.state.tasks.get(dask_key)
        return task is None or task.state in ("cancelled", "released")


def receive_file(
    plugin_name: str, relative: str, data: bytes, dask_worker: Any = None
) -> str:
    """Run on a worker by ``Client.run`` (the client's ``send_file``; Dask passes
    the worker as ``dask_worker``): write a file into the computation's directory
    there, never outside it; '' or the error."""
    from dispynb.errors import DispynbError
    from dispynb.protocol.files import write_inside

    plugin = dask_worker.plugins.get(plugin_name) if dask_worker else None
    job_dir = getattr(plugin, "job_dir", None)
    if not isinstance(plugin, ComputationPlugin) or job_dir is None:
        return "the computation is not set up on that worker"
    try:
        write_inside(job_dir, relative, data)
    except (DispynbError, OSError) as exc:
        return f"{relative!r} not written on the worker: {exc}"
    return ""


def answer_file(
    plugin_name: str, dask_key: str, request: int, error: str, dask_worker: Any = None
) -> None:
    """Run on a worker by ``Client.run`` (on its event loop): the client's answer
    about file ``request`` of the job of ``dask_key`` ("" once it wrote it), to
    the job's runner, where ``dispy_send_file`` waits for it. An answer for a job
    that ended is dropped."""
    plugin = dask_worker.plugins.get(plugin_name) if dask_worker else None
    runner = getattr(plugin, "running", {}).get(dask_key)
    if runner is None:
        return
    with contextlib.suppress(OSError), runner.lock:
        runner.conn.send_bytes(pickle.dumps((FILE_ANSWER, request, error)))


def run_job(
    plugin_name: str, limits: tuple[float | None, int | None], *buffers: bytes
) -> tuple[tuple[Any, ...], list[bytes], str]:
    """The Dask task of a dispynb job: run it in one of the computation's runners.

    Returns ``(meta, result_buffers, worker_address)``; ``meta`` is ``(outcome,
    start, end, stdout, stderr, exception)``.
    """
    worker = get_worker()
    plugin = worker.plugins.get(plugin_name)
    key = str(worker.get_current_task())
    if not isinstance(plugin, ComputationPlugin):
        meta = ("setup", 0.0, 0.0, "", "", "the computation is not set up here")
        return meta, [], worker.address
    meta, result = plugin.run(key, list(buffers), limits)
    value = (meta, result, worker.address)
    _, _, _, stdout, stderr, exception = meta
    size = sum(map(len, result)) + len(stdout) + len(stderr) + len(exception or "")
    if size <= PUSH_RESULT:
        # Small outcomes go to the client now, on the stream Dask's task-finished
        # message follows: no gather round trip (the returned copy stays for one).
        data = pickle.dumps(value, protocol=5)
        worker.log_event(plugin.topic, ["done", key, data])
    return value


def _node_name(worker: Any) -> str:
    """The worker's name as a node's (``dispy_node_name``, the status table's
    rows): a worker given none (``dask worker`` without ``--name``) is named by
    its address, ``tcp://10.0.0.2:40123``; ``10.0.0.2:40123`` then, which the
    table's 15 characters still tell from the other workers'."""
    name = str(worker.name)
    return name.rsplit("://", 1)[-1] if name == worker.address else name
