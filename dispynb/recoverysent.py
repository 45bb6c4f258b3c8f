"""What `recover_jobs` gets besides results: the files jobs sent (``dispy_send_file``)
and their provisional results (``dispy_provisional_result``), kept for a client that
crashed by its nodes or its scheduler.

A file is saved under the ``files_dir`` given to `recover_jobs` (the current
directory by default), at the path the job sent it to, as the crashed cluster would
have saved it. A provisional result shows on a job that has not ended when
`recover_jobs` returns (status ``ProvisionalResult``, ``job.result`` the latest one),
as it would on the crashed cluster's job; a job's final result replaces it. A job
that sends a file while `recover_jobs` is attached (through a scheduler) waits for
the answer (its ``dispy_send_file`` returns 0 or -1): it is given, as a cluster
gives it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

from dispynb.backends.jobfiles import refuse_recovery_file, unsaved_file
from dispynb.errors import DispynbError, SerializationError
from dispynb.job import DispyJob
from dispynb.protocol import serialize
from dispynb.protocol.files import write_inside
from dispynb.protocol.messages import FileFromNode, FileSaved, JobProvisional, Message
from dispynb.wording import counted

logger = logging.getLogger("dispynb.recovery")


class SentWhileAway:
    """Takes the kept files and provisional results of one recovery (`take`);
    ``reply`` sends the answer a job waits for (`FileSaved`) to the peer."""

    def __init__(self, files_dir: str | None, reply: Callable[[Message], None]) -> None:
        self.files_dir = files_dir or os.getcwd()
        self._reply = reply
        #: Files saved, and not saved (the reason logged).
        self.saved = 0
        self.unsaved = 0

    def take(
        self,
        message: Message,
        buffers: list[memoryview],
        jobs: Mapping[int, DispyJob],
        node: str,
    ) -> bool:
        """Handle ``message`` if it is a kept file or provisional result (of one of
        ``jobs``, by key, for a provisional result); False if it is neither."""
        if isinstance(message, FileFromNode):
            error = self._save(message, buffers, node)
            if message.request:  # a job still running waits to know
                answer = FileSaved(
                    comp_id=message.comp_id,
                    key=message.key,
                    request=message.request,
                    error=error,
                )
                self._reply(answer)
            return True
        if isinstance(message, JobProvisional):
            job = jobs.get(message.key)
            if job is not None and not job.done():
                try:
                    job._set_provisional(serialize.loads(buffers))
                except SerializationError as exc:
                    logger.warning(
                        "provisional result of job %d from %s cannot be unpickled: %s",
                        message.key,
                        node,
                        exc,
                    )
            return True
        return False

    def _save(self, message: FileFromNode, buffers: list[memoryview], node: str) -> str:
        """Write the file; why it was not written ("" once it was)."""
        try:
            if len(buffers) != 1:
                raise DispynbError("a file from a node comes in one buffer")
            refuse_recovery_file(self.files_dir, message.path)
            saved = write_inside(self.files_dir, message.path, buffers[0])
        except (DispynbError, OSError) as exc:
            self.unsaved += 1
            reason = unsaved_file(self.files_dir, str(message.path)[:200], exc)
            logger.warning("file a job sent, kept by %s, not saved: %s", node, reason)
            return reason
        self.saved += 1
        # Per file at debug: a recovery of many files says them in one line (`said`).
        logger.debug("saved %s (sent by job %d, kept by %s)", saved, message.key, node)
        return ""

    def said(self, node: str) -> None:
        """Log, in one line, how many files kept by ``node`` were saved, and where
        (nothing if none was): a quiet script's stderr, not a line a file."""
        if self.saved:
            logger.info(
                "saved %s jobs sent, kept by %s, under %s",
                counted(self.saved, "file"),
                node,
                self.files_dir,
            )
