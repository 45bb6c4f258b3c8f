"""The files of a computation's jobs on this node: the files a job is given, placed
in the computation's directory while a job that needs them runs, and the files a job
sends its client (``dispy_send_file``), held until the client answers."""

from __future__ import annotations

import contextlib
import logging
import os
import time

from dispynb.errors import DispynbError, ProtocolError
from dispynb.objects import is_object_file
from dispynb.protocol.files import safe_relative_path
from nodeserver.compstate import NodeJob, Worker, _ComputationState
from nodeserver.ipc import FileAnswer, SendFile

logger = logging.getLogger("nodeserver.computation")


class _JobFiles(_ComputationState):
    """A `Computation`'s part that handles its jobs' files."""

    def _on_send_file(
        self, worker: Worker, message: SendFile, buffers: list[memoryview]
    ) -> None:
        head = worker.assigned[0] if worker.assigned else None
        if head is None or head.key != message.key or head.reported:
            error = "its job was cancelled or has ended"
        else:
            if head.start_held:
                self._runs_after_all(head, time.time())
            size, cap = sum(b.nbytes for b in buffers), self._file_cap()
            try:
                path = safe_relative_path(message.path)
            except DispynbError as exc:
                worker.log_odd(
                    logging.WARNING,
                    "job %d sent a file with a bad name: %s",
                    message.key,
                    exc,
                )
                error = str(exc)
            else:
                error = ""
                if cap and size > cap:
                    # The job checks it, but may forge the message: one over its
                    # client's messages made the client drop this node.
                    error = f"the file is {size} bytes, over the limit of {cap}"
                    worker.log_odd(
                        logging.WARNING,
                        "job %d sent a file of %d bytes, over the %d bytes its "
                        "client takes: not sent",
                        message.key,
                        size,
                        cap,
                    )
            if not error:
                request = 0
                if message.request:
                    request = next(self._file_request_ids)
                    # Held until answered: the client may go before it answers.
                    keepable = (message.key, path, buffers) if self._keep_file else None
                    self._file_requests[request] = (worker, message.request, keepable)
                error = self._report_file(message.key, path, buffers, request)
                if not error or not request:
                    return
                del self._file_requests[request]
        if message.request:
            self._answer_file(worker, message.request, error)

    def file_saved(self, request: int, error: str) -> None:
        """The client's answer to file ``request`` ("" once written): the job that
        sent it is waiting for it (its ``dispy_send_file`` returns)."""
        waiting = self._file_requests.pop(request, None)
        if waiting is not None:
            self._answer_file(waiting[0], waiting[1], error)

    def client_lost(self, reason: str, keep: bool = False) -> None:
        """The client's connection ended: no answer will come for the files sent.
        With ``keep`` (the keeper adopted the computation), those still waiting
        are kept for its recovery as a file sent later would be: the node still
        has them, and the client may not have written them."""
        for request in list(self._file_requests):
            worker, asked, keepable = self._file_requests.pop(request)
            told = None
            if keep and keepable is not None and self._keep_file is not None:
                told = self._keep_file(*keepable)
            self._answer_file(worker, asked, told or reason)

    @staticmethod
    def _answer_file(worker: Worker, request: int, error: str) -> None:
        if not worker.stream_closed:
            with contextlib.suppress(DispynbError):
                worker.conn.write(FileAnswer(request=request, error=error))

    def _place_job_files(self, job: NodeJob) -> None:
        for relative, digest, executable in job.files:
            if (
                self._job_files[relative] == 0
                and self._own_files.get(relative) != digest
            ):
                refused = self._refused_files.get(digest)
                if refused is not None:
                    raise ProtocolError(f"file {relative!r} was refused: {refused}")
                self._store.place(digest, self.path, relative, executable)
                if is_object_file(relative) and digest not in self._objects:
                    self._objects.add(digest)
                    self._store.hold(digest)
                    self._store.disposable(digest)
            self._job_files[relative] += 1
        job.placed = True

    def _release_job_files(self, job: NodeJob) -> None:
        """A job's own files leave the directory when no running job needs them."""
        if not job.placed:
            return
        job.placed = False
        for relative, digest, _executable in job.files:
            self._job_files[relative] -= 1
            if self._job_files[relative] <= 0:
                del self._job_files[relative]
                own = self._own_files.get(relative)
                with contextlib.suppress(OSError, DispynbError):
                    if own is None:
                        os.unlink(os.path.join(self.path, relative))
                    elif own != digest:  # the job's own version: the computation's back
                        self._store.place(own, self.path, relative)
