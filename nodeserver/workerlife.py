"""The life of a computation's process and workers, seen from the node server: the
process started (files placed, computation loaded, setup run) and closed (jobs
finished or dropped, cleanup, exit), its reports (workers started and exited, setup
done or failed, its own end), and the jobs of a worker or process lost."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Sequence

from dispynb.errors import ConnectionClosedError, DispynbError, SetupError
from dispynb.jobenv import node_output_cap, output_bytes
from dispynb.protocol.messages import CRASHED
from dispynb.transport.connection import Connection
from nodeserver.compstate import NodeJob, Worker, _ComputationState
from nodeserver.containment import HeldWorker, node_pids_root, place_in_new_cgroup
from nodeserver.control import ControlChannel
from nodeserver.fdoutput import give_output_files, take_output_files
from nodeserver.ipc import (
    IpcMessage,
    Load,
    Loaded,
    LoadFailed,
    NodeShutdown,
    Shutdown,
    WorkerExited,
    WorkerStarted,
)
from nodeserver.jobreasons import (
    CHANNEL_LOST_STATUS,
    channel_lost_reason,
    crash_reason,
    mem_limit_note,
)
from nodeserver.jobstops import drop_interrupt_page, give_interrupt_page
from nodeserver.launcher import process_state
from nodeserver.leftovers import remove_empty_parents

logger = logging.getLogger("nodeserver.computation")

#: Bytes of a worker's `Done` that are neither the result, its buffers' framing
#: nor the output: its fields and the frame's prefix (some hundred bytes).
DONE_HEADER_ROOM = 4 * 1024

#: Bytes of framing (a length and a kind letter, 5 bytes) a result's buffers take
#: per this many bytes of a message: out-of-band buffers are 64 KiB or more.
BYTES_PER_FRAMING_BYTE = 8 * 1024

#: Bytes of a message to the client kept for its header (`_client_room`).
CLIENT_HEADER_ROOM = 1024 * 1024

#: Why `start` failed when its computation was closed meanwhile (its client left).
CLOSED_DURING_SETUP = "the computation was closed during its setup"

#: Why `start` failed when the node stopped during the setup (SIGTERM, systemd).
NODE_STOPPED_DURING_SETUP = (
    "the node shut down during the setup (it was stopped: SIGTERM, a service "
    "manager, or a shutdown request)"
)

#: Seconds to wait for a computation process to exit after Shutdown.
SHUTDOWN_GRACE = 10.0


#: Seconds a setup past its setup_timeout has to end its process tree after
#: Shutdown (its node watch does so at once) before it is killed.
SETUP_STOP_GRACE = 5.0


#: Seconds a job whose worker died of SIGTERM (or whose computation process died)
#: waits before being reported failed: if the node received the same signal
#: meanwhile, the job is lost with the node.
STOP_SIGNAL_GRACE = 1.0


#: `time.monotonic` when running jobs' workers were found dead of SIGTERM (the
#: last ones): `advise_kill_mode` and `stop_signal_deaths` tell whether the node's
#: own stop signal killed them.
_stop_signal_deaths: collections.deque[float] = collections.deque(maxlen=4096)
#: Whether `advise_kill_mode` has said its piece (once per node process).
_kill_mode_advised = False


def stop_signal_deaths(since: float) -> int:
    """How many running jobs died of SIGTERM since ``since`` (`time.monotonic`):
    a stop signal sent to the node's whole unit or job step killed them, they did
    not drain."""
    return sum(1 for when in _stop_signal_deaths if when >= since)


def advise_kill_mode(since: float) -> None:
    """Running jobs died of SIGTERM since ``since`` (`time.monotonic`; the node's
    own stop signal came then): under systemd, the unit's KillMode sent it to every
    process of the unit, so they could not drain. Say once how to fix that (a batch
    system signals a job step whole by design: nothing to say there)."""
    global _kill_mode_advised
    if (
        _kill_mode_advised
        or not os.environ.get("INVOCATION_ID")  # not a systemd unit
        or not _stop_signal_deaths
        or _stop_signal_deaths[-1] < since
    ):
        return
    _kill_mode_advised = True
    logger.warning(
        "running jobs got the stop signal too and ended instead of draining: "
        "systemd signals every process of the unit (KillMode=control-group); set "
        "KillMode=mixed in the unit's [Service] section so that they may finish "
        "within --drain-timeout"
    )


def _discard(entry: list[object], buffers: list[memoryview]) -> None:
    """A `Report` that sends nothing."""


#: Seconds between looks at whether a computation's process is stopped.
STOPPED_CHECK = 1.0


class _WorkerLife(_ComputationState):
    """The computation's process from start to close, its reports, and lost
    workers' jobs settled."""

    # -- lifecycle -----------------------------------------------------------------

    async def start(
        self,
        bundle: list[memoryview],
        files: Sequence[tuple[str, str, bool]] = (),
        setup_timeout: float | None = None,
    ) -> int:
        """Start the process, load the computation, run setup; return worker count.

        Raises `SetupError` with the node's explanation and traceback on failure.
        """
        if self._removals is not None:
            # Noted first: a node killed from now on leaves it to the next one (a
            # kept one too: its files stay, its unread results in /dev/shm go).
            self._removal_note = self._removals.note(
                self.path, self._home, keep=not self._remove_path
            )
        if self._path_users is not None and not self._path_counted:
            self._path_users[self.path] += 1
            self._path_counted = True
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        try:
            for relative, digest, executable in files:
                self._store.place(digest, self.path, relative, executable)
                self._own_files[relative] = digest
        except (DispynbError, OSError) as exc:
            raise SetupError(f"cannot place the computation's files: {exc}") from exc
        loop = asyncio.get_running_loop()
        # setup_timeout bounds the whole setup: making the process included.
        deadline = None if setup_timeout is None else loop.time() + setup_timeout
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._process = await self._launcher.start(
                child_sock, self.path, setup_timeout
            )
        except BaseException:
            parent_sock.close()
            raise
        if self._closing:
            # Closed while its process was being made (`close` found none to stop):
            # nothing else would ever stop this one.
            parent_sock.close()
            self._process.kill()
            await self._process.wait()
            raise SetupError(CLOSED_DURING_SETUP)
        self._control = ControlChannel(
            parent_sock, self._on_control, self._on_control_closed, self._max_size
        )
        pids_root = node_pids_root() if self.limits.max_pids else None
        if pids_root is not None and self.limits.max_pids:
            # Off the start path: the process spends far longer importing than this
            # move takes (see `containment.place_in_new_cgroup`).
            self._first_cgroup = await asyncio.get_running_loop().run_in_executor(
                None,
                place_in_new_cgroup,
                pids_root,
                self._process.pid,
                self.limits.max_pids,
            )
        if self._closing:
            # Closed while the process was placed (its client went away): close()
            # sent it Shutdown and closed the channel; no Load can follow. close()
            # found no cgroup to remove then.
            if self._first_cgroup is not None:
                with contextlib.suppress(OSError):
                    os.rmdir(self._first_cgroup)
            raise SetupError(CLOSED_DURING_SETUP)
        try:
            await self._control.send(
                Load(
                    name=self.name,
                    workers=self._n_workers,
                    node_name=self._node_name,
                    node_address=self._node_address,
                    job_path=self.path,
                    max_file_size=self._file_cap(),
                    max_output=self._max_output(),
                    max_result=self._result_cap(),
                    node_result_room=self._node_result_room(),
                    node_max_message=self._max_size,
                    max_pids=self.limits.max_pids,
                    fresh_process=self.limits.fresh_process,
                    pids_root=pids_root or "",
                    first_cgroup=self._first_cgroup,
                    node_debug=logger.isEnabledFor(logging.DEBUG),
                ),
                bundle,
            )
        except ConnectionClosedError:
            if self._closing:
                raise SetupError(CLOSED_DURING_SETUP) from None
            raise SetupError(
                "the computation's process on the node exited during setup"
            ) from None
        left = None if deadline is None else max(deadline - loop.time(), 0.0)
        try:
            await asyncio.wait_for(asyncio.shield(self._loaded), left)
        except SetupError as exc:
            if self._closing and self._node_stopping():
                raise SetupError(NODE_STOPPED_DURING_SETUP) from exc
            raise
        except TimeoutError:
            self._loaded.cancel()  # the process's exit must not report on it later
            await self._stop_setup()
            raise SetupError(
                f"setup did not finish within {setup_timeout} s (setup_timeout)"
            ) from None
        self._ready = True
        self._budget.wait(id(self), self._pump)
        return self._n_workers

    async def _stop_setup(self) -> None:
        """End a setup that ran out of time, with what it started.

        `Shutdown` first: the process's node watch ends every descendant (a
        ``subprocess`` the setup started) before it exits. A kill alone ends only
        the process; without a zygote its children would go on under init. The
        kill stays the fallback for a process that does not stop.
        """
        if self._process is None:
            return
        if self._control is not None:
            with contextlib.suppress(DispynbError):
                await self._control.send(Shutdown())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._process.wait(), SETUP_STOP_GRACE)
                return
        logger.warning("computation %s did not stop its setup; killing it", self.name)
        self._process.kill()

    def _file_cap(self) -> int:
        """Bytes a file a job sends may have (0: no limit): the node's
        ``--max-file-size``, within one message of the client (less a header's
        room): a file travels whole."""
        cap = self._store.max_file_size
        room = self._client_room()
        if room:
            cap = room if not cap else min(cap, room)
        return cap

    def _client_room(self) -> int:
        """Bytes of payload one message to the client takes (0: not known): its
        ``max_message_size``, less a header's room."""
        client = self.limits.max_message
        return max(client - CLIENT_HEADER_ROOM, client // 2) if client else 0

    def _provisional_cap(self) -> int:
        """Bytes a provisional result may have: as a result (`_result_cap`), and
        within one message to the client (it is not sent in chunks)."""
        cap, room = self._result_cap(), self._client_room()
        return min(cap, room) if room else cap

    def _result_cap(self) -> int:
        """Bytes a pickled result may have: the client's cap, within what the
        worker's channel to this node takes (with room for the message's header)."""
        room = self._node_result_room()
        cap = self.limits.max_result
        return room if cap is None else min(cap, room)

    def _node_result_room(self) -> int:
        """Bytes of a pickled result the worker's channel to this node takes,
        with room for the message's header and the job's output.

        The room for the header is what it takes, not a fixed MiB: a fixed 1 MiB
        left a node started with ``--max-message-size`` 1 MB (accepted) room for
        no result at all, every job failing "over the limit of 0 bytes"."""
        headroom = (
            DONE_HEADER_ROOM
            + self._max_size // BYTES_PER_FRAMING_BYTE
            # Its stdout and stderr, each kept to `_max_output` characters.
            + 2 * output_bytes(self._max_output())
        )
        return max(self._max_size - headroom, 0)

    def _max_output(self) -> int:
        """Characters of each output stream a job keeps: the client's
        ``max_output_size`` (None: all), within a quarter of what this node's
        messages take (as UTF-8, two streams): the rest is the result's.

        A job's output goes through the node whole (as the message it came in,
        the text it decodes to, then the UTF-8 it sends on: some three times its
        size): with None, or over what its messages take, a job printing 300 MiB
        made the node grow 900 MiB, or its worker was dropped with its output;
        and 200 M characters left no room for any result."""
        cap = node_output_cap(self._max_size)
        wanted = self.limits.max_output
        return cap if wanted is None else min(wanted, cap)

    @property
    def closing(self) -> bool:
        """`close` was called (it may still be running)."""
        return self._closing

    async def close(self, terminate: bool) -> None:
        """Let jobs finish (or kill them), run cleanup, end the process.

        Once no job is left, the end of the process (cleanup, then SIGKILL after
        `SHUTDOWN_GRACE` s) runs to its end even if this call is cancelled (the
        keeper gives up on an adopted computation as its client sets it up again),
        and a later call waits for it: cancelled half way, the process ran on for
        ever, its cleanup hung, closed by nobody."""
        if self._closing:
            if self._ending is not None:
                await asyncio.shield(self._ending)
            return
        self._closing = True
        # Its client takes no more of its files: the jobs waiting are told.
        self.client_lost("the computation was closed before its client saved the file")
        if self._handed_back:
            # The node shuts down: its client sees it leave and settles (or, if
            # reentrant, resubmits elsewhere) the jobs still running; a crash report
            # for them, as their workers stop now, would make them fail instead.
            self._report = _discard
        if terminate:
            for job in self._queue:
                self._finish_unrun(job, "the computation was closed before the job ran")
            self._queue.clear()
        else:
            try:
                while self._queue or any(w.assigned for w in self._workers.values()):
                    await self._idle_or_dead()
            except asyncio.CancelledError:
                # Given up waiting (the keeper's time for a gone client's jobs
                # ran out): nothing is closed yet, so close(terminate=True) may
                # still end the jobs and the process.
                self._closing = False
                raise
        self._ending = asyncio.get_running_loop().create_task(self._end())
        await asyncio.shield(self._ending)

    async def _end(self) -> None:
        """`close`'s end, its jobs over: stop the process, free what it held."""
        self._budget.forget(id(self))  # only now: a backlog still needs CPUs
        if self._control is not None and self._process is not None:
            with contextlib.suppress(DispynbError):
                await self._control.send(Shutdown())
            try:
                await asyncio.wait_for(self._process.wait(), SHUTDOWN_GRACE)
            except TimeoutError:
                logger.warning("computation %s did not stop; killing it", self.name)
                self._process.kill()
                await self._process.wait()
            self._control.close()
        if self._first_cgroup is not None:
            # Normally gone with the first worker; left if the process died first.
            with contextlib.suppress(OSError):
                os.rmdir(self._first_cgroup)
        for worker in list(self._workers.values()):
            worker.conn.close()
            self._lose_worker(worker)
        shared = self._path_shared()
        if self._remove_path and not shared:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._home is not None:
            remove_empty_parents(self.path, self._home)
        if self._removal_note is not None and self._removals is not None:
            self._removals.done(self._removal_note)
            self._removal_note = None
        for digest in self._objects:  # put in a cluster (JobCluster.put)
            self._store.release(digest)
        self._objects.clear()

    def _path_shared(self) -> bool:
        """Stop counting this computation in ``path``; whether another live one
        still uses it (the same ``dest_path``: its files stay, as in dispy)."""
        users = self._path_users
        if users is None or not self._path_counted:
            return False
        self._path_counted = False
        users[self.path] -= 1
        if users[self.path] > 0:
            return True
        del users[self.path]
        return False

    async def wait_idle(self) -> None:
        """Wait until no job is queued or running here (or the process died)."""
        while (
            self._queue or any(w.assigned for w in self._workers.values())
        ) and not self._control_closed.is_set():
            await self._idle_or_dead()

    async def _idle_or_dead(self) -> None:
        """Wait for the next job to end (or the process to die)."""
        if self._control_closed.is_set():
            self._queue.clear()
            return
        # Shared by concurrent waiters (close and wait_idle); shielded so that one
        # being cancelled does not cancel the others' wait.
        if self._progress is None or self._progress.done():
            self._progress = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._progress)

    # -- messages from the computation process ------------------------------------

    def _on_control(
        self, message: IpcMessage, buffers: list[memoryview], fds: list[int]
    ) -> None:
        if isinstance(message, WorkerStarted) and fds:
            self._add_worker(message.pid, fds[0], fds[1] if len(fds) > 1 else None)
        elif isinstance(message, WorkerExited):
            worker = self._workers.get(message.pid)
            if worker is not None:
                worker.returncode = message.returncode
                worker.exit_reason = message.reason
                # The job ends with its worker, even if a process it started still
                # holds the worker's socket: what the worker wrote is read, then EOF.
                with contextlib.suppress(OSError):
                    worker.sock.shutdown(socket.SHUT_RD)
                self._maybe_lost(worker)
            # What its job left that its worker no longer holds: adopted by the
            # node (a daemon, once the worker died abruptly, without a cgroup).
            self._launcher.sweep_orphans()
        elif isinstance(message, Loaded):
            if not self._loaded.done():
                self._loaded.set_result(None)
                self._watch_stopped()
        elif isinstance(message, LoadFailed) and not self._loaded.done():
            self._loaded.set_exception(SetupError(message.message, message.traceback))
        elif isinstance(message, NodeShutdown):  # from the cleanup function
            self._shutdown_requested()

    def _watch_stopped(self) -> None:
        """Every `STOPPED_CHECK` s while the computation runs: continue its process
        if it is stopped. A job that sent it SIGSTOP (``os.getppid()`` is it) left
        it unable to report a dead worker or start another: the job of a worker
        that died waited for ever, the jobs after it never ran, and the process
        outlived the node (stopped, it never saw the node go)."""
        process = self._process
        if self._closing or process is None or self._control_closed.is_set():
            return
        if process_state(process.pid) == b"T":
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
            (logger.warning if not self._continued else logger.debug)(
                "computation %s: its process was stopped (SIGSTOP, from a job?): "
                "continued (each time it is, within %g s)",
                self.name,
                STOPPED_CHECK,
            )
            self._continued += 1
        asyncio.get_running_loop().call_later(STOPPED_CHECK, self._watch_stopped)

    def _shutdown_requested(self) -> None:
        if self.on_shutdown_request is not None:
            self.on_shutdown_request()

    def _add_worker(self, pid: int, fd: int, pid_fd: int | None) -> None:
        sock = socket.socket(fileno=fd)
        conn = Connection.over_socket(
            sock,
            f"worker {pid}",
            IpcMessage,
            trusted_max_size=self._max_size,
        )
        worker = Worker(pid=pid, conn=conn, sock=sock, process=HeldWorker(pid, pid_fd))
        if self._held:
            conn.hold_reading(True)
        give_interrupt_page(worker)
        give_output_files(worker, self.path)
        self._workers[pid] = worker
        task = asyncio.get_running_loop().create_task(self._read_worker(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._pump()

    def _maybe_lost(self, worker: Worker) -> None:
        """Once a worker's stream is drained and its exit known, settle its jobs."""
        if worker.stream_closed and (
            worker.returncode is not None or self._control_closed.is_set()
        ):
            self._lose_worker(worker)

    def _lose_worker(self, worker: Worker) -> None:
        if self._workers.pop(worker.pid, None) is None:
            return
        if worker.returncode != 0:
            # Killed after it wrote a result to shared memory, before it reported
            # it: unlinked before its job is reported (its client hears of none).
            self.result_objects.worker_lost(worker.pid)
        worker.process.close()
        drop_interrupt_page(worker)
        returncode = worker.returncode
        if returncode == CHANNEL_LOST_STATUS and not worker.channel_error:
            worker.channel_error = channel_lost_reason()
        # What it wrote below Python for the job it ran, if it died running one.
        output = take_output_files(worker)
        requeue: list[NodeJob] = []
        for position, job in enumerate(worker.assigned):
            self._release_job_files(job)
            if job.timer is not None:
                job.timer.cancel()
                job.timer = None
            if job.cancelled:
                self._finish_killed(job)
            elif job.reported:
                continue
            elif job.skipping and (position > 0 or worker.retiring):
                # To be cancelled unless started; behind another, or the head of a
                # worker replaced after its job was interrupted (its Skip came
                # before): not started. Queued again, it would run elsewhere.
                reason = "job cancelled at the client's request before it started"
                self._finish_unrun(job, reason)
            elif (
                position == 0
                and not worker.retiring
                and returncode in (-signal.SIGTERM, None)
                and not worker.exit_reason
            ):
                # A stop signal sent to the node's whole job step or unit (SLURM at
                # walltime or scancel, systemd) kills its workers and computation
                # process too: such a job is lost with the node (the client runs it
                # again if reentrant), not failed. Decide once the node has handled
                # its own signal.
                job.reported = True
                _stop_signal_deaths.append(time.monotonic())
                asyncio.get_running_loop().call_later(
                    STOP_SIGNAL_GRACE,
                    self._report_unless_stopping,
                    job,
                    crash_reason(returncode)
                    if returncode is not None
                    else "the computation's process on the node died",
                    output,
                )
            elif position == 0 and not worker.retiring:
                reason = worker.channel_error or (
                    worker.exit_reason or crash_reason(returncode)
                    if returncode is not None
                    else "the computation's process on the node died"
                )
                if job.mem_limit is not None:
                    reason += mem_limit_note(job.mem_limit)
                job.reported = True
                self._report_unrun(job, CRASHED, reason, output)
            elif position == 0 and not job.start_held:
                # Reported started, on a worker the node killed (`_retire`): run
                # again, it would run twice under one attempt, Running twice.
                self._report_stopped_by_node(job)
            elif job.dropped is not None:
                # Not started (or not said to), and no longer to run here.
                job.reported = True
                self._report_unrun(job, *job.dropped)
            else:
                requeue.append(job)  # never started (or not said to): run it again
        worker.assigned.clear()
        for job in reversed(requeue):
            self._requeue_or_fail(job)
        self._release_cpu(worker)
        self._pump()
        self._note_progress()

    def _report_unless_stopping(
        self, job: NodeJob, reason: str, output: tuple[str, str]
    ) -> None:
        if self._node_stopping():
            logger.info(
                "job %d was killed by the node's stop signal: left to its client "
                "as a job of a lost node",
                job.key,
            )
            return
        if job.mem_limit is not None:
            reason += mem_limit_note(job.mem_limit)
        self._report_unrun(job, CRASHED, reason, output)

    def _on_control_closed(self) -> None:
        self._control_closed.set()
        self._launcher.sweep_orphans()  # what setup started, if the process died
        if not self._loaded.done():
            self._loaded.set_exception(
                SetupError("the computation's process on the node exited during setup")
            )
        for worker in list(self._workers.values()):
            self._maybe_lost(worker)
        if not self._closing:
            queued = list(self._queue)
            self._queue.clear()
            # As for its workers (_lose_worker): a stop signal to the whole node
            # may have ended it; then its jobs are lost with the node.
            asyncio.get_running_loop().call_later(
                STOP_SIGNAL_GRACE, self._process_lost, queued
            )
        self._note_progress()

    def _process_lost(self, queued: list[NodeJob]) -> None:
        if self._node_stopping():
            logger.info(
                "computation %s ended with the node's stop signal: its jobs are "
                "left to their client as jobs of a lost node",
                self.name,
            )
            return
        reason = "the computation's process on the node died"
        for job in queued:
            self._report_unrun(job, CRASHED, reason)
        # Before it was ready, start() reports the failure (with setup's reason).
        if self.on_failure is not None and self._ready:
            self.on_failure(reason)

    def _note_progress(self) -> None:
        if self._progress is not None and not self._progress.done():
            self._progress.set_result(None)
