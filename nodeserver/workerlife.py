"""The computation process's reports to the node server (workers started and exited,
setup done or failed, its own end), and the jobs of a worker or process lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket

from dispynb.errors import SetupError
from dispynb.protocol.messages import CRASHED
from dispynb.transport.connection import Connection
from nodeserver.compstate import NodeJob, Worker, _ComputationState
from nodeserver.ipc import (
    IpcMessage,
    Loaded,
    LoadFailed,
    NodeShutdown,
    WorkerExited,
    WorkerStarted,
)
from nodeserver.jobreasons import crash_reason, mem_limit_note

logger = logging.getLogger("nodeserver.computation")

#: Seconds a job whose worker died of SIGTERM (or whose computation process died)
#: waits before being reported failed: if the node received the same signal
#: meanwhile, the job is lost with the node.
STOP_SIGNAL_GRACE = 1.0


class _WorkerLife(_ComputationState):
    """The computation process's reports, and lost workers' jobs settled."""

    def _on_control(
        self, message: IpcMessage, buffers: list[memoryview], fd: int | None
    ) -> None:
        if isinstance(message, WorkerStarted) and fd is not None:
            self._add_worker(message.pid, fd)
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
        elif isinstance(message, Loaded):
            if not self._loaded.done():
                self._loaded.set_result(None)
        elif isinstance(message, LoadFailed) and not self._loaded.done():
            self._loaded.set_exception(SetupError(message.message, message.traceback))
        elif isinstance(message, NodeShutdown):  # from the cleanup function
            self._shutdown_requested()

    def _shutdown_requested(self) -> None:
        if self.on_shutdown_request is not None:
            self.on_shutdown_request()

    def _add_worker(self, pid: int, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        conn = Connection.over_socket(
            sock,
            f"worker {pid}",
            IpcMessage,
            trusted_max_size=self._max_size,
        )
        worker = Worker(pid=pid, conn=conn, sock=sock)
        if self._held:
            conn.hold_reading(True)
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
        returncode = worker.returncode
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
                asyncio.get_running_loop().call_later(
                    STOP_SIGNAL_GRACE,
                    self._report_unless_stopping,
                    job,
                    crash_reason(returncode)
                    if returncode is not None
                    else "the computation's process on the node died",
                )
            elif position == 0 and not worker.retiring:
                reason = (
                    worker.exit_reason or crash_reason(returncode)
                    if returncode is not None
                    else "the computation's process on the node died"
                )
                if job.mem_limit is not None:
                    reason += mem_limit_note(job.mem_limit)
                job.reported = True
                self._report_unrun(job, CRASHED, reason)
            else:
                requeue.append(job)  # never started, or stopped by us: run it again
        worker.assigned.clear()
        for job in reversed(requeue):
            self._requeue_or_fail(job)
        self._release_cpu(worker)
        self._pump()
        self._note_progress()

    def _report_unless_stopping(self, job: NodeJob, reason: str) -> None:
        if self._node_stopping():
            logger.info(
                "job %d was killed by the node's stop signal: left to its client "
                "as a job of a lost node",
                job.key,
            )
            return
        if job.mem_limit is not None:
            reason += mem_limit_note(job.mem_limit)
        self._report_unrun(job, CRASHED, reason)

    def _on_control_closed(self) -> None:
        self._control_closed.set()
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
