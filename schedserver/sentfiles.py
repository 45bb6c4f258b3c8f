"""The files jobs send their client (``dispy_send_file``) through the scheduler.

Each goes to the client under a number of the scheduler's (two nodes' numbers may
be the same) and the job waits for the client's answer, which the scheduler passes
back to the node; a client that is away, or replaced by `recover_jobs`, cannot
answer, and the job is told whether the scheduler kept the file for its recovery.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING

from dispynb.protocol.handshake import peer_text
from dispynb.protocol.messages import (
    ComputationSetup,
    FileFromNode,
    FileSaved,
    Message,
)

if TYPE_CHECKING:
    from schedserver.computation import QueuedJob, Upstream
    from schedserver.server import SchedulerServer
    from schedserver.session import SchedulerSession
    from schedserver.spill import KeptMessages

#: What a job that sends a file while its client is away is told.
_CLIENT_AWAY = (
    "the client is away (its connection to the scheduler ended): the file was not saved"
)
_KEPT = "; the scheduler keeps it for the client's recover_jobs"
_REPLACED = (
    "the client it was sent to did not answer before recover_jobs took its "
    "computation, and the scheduler did not keep it (--max_kept): the file was not "
    "saved"
)
_NOT_READ = (
    "the client does not read what is sent to it and the scheduler holds no more "
    "for it (--max_kept): the file was not sent"
)


class _SentFiles:
    """`SharedComputation`'s part that passes on the files its jobs send."""

    server: SchedulerServer
    session: SchedulerSession | None
    setup: ComputationSetup
    comp_id: int
    kept: KeptMessages
    running: dict[int, QueuedJob]
    file_requests: dict[int, tuple[Upstream, int, int, bool]]
    _file_request_ids: itertools.count[int]

    def to_client(
        self,
        message: Message,
        buffers: list[memoryview] | None = None,
        *,
        job: tuple[int, int] | None = None,
    ) -> None:
        raise NotImplementedError  # `SharedComputation.to_client`

    def foreign(self, upstream: Upstream, count: int) -> None:
        raise NotImplementedError  # `SharedComputation.foreign`

    def job_file(
        self, upstream: Upstream, message: FileFromNode, buffers: list[memoryview]
    ) -> None:
        """A file a job sent (``dispy_send_file``), for the client: kept with the
        attempt of the job running on ``upstream``'s node, so that the client's
        acknowledgement of that attempt drops it too (the client had the file
        before that attempt's result: they come on one connection, in order). A
        file naming no job running there is dropped (`schedserver.nodeclaims`), its
        job told if it waits."""
        running = self.running.get(message.key)
        job = (
            (running.key, running.attempt)
            if running is not None and running.node == upstream.node.name
            else None
        )
        if job is None:  # not a job of this node's (a client drops it as well)
            self.foreign(upstream, 1)
            if message.request:
                reason = f"job {message.key} does not run on this node"
                self._answer_file(upstream, message.key, message.request, reason)
            return
        if not message.request:
            self.to_client(message, buffers, job=job)
        elif self.session is None:
            # The job waits: told now whether the file is kept for the client.
            dropped = self.kept.dropped
            self.to_client(dataclasses.replace(message, request=0), buffers, job=job)
            kept = self.setup.recovery_id is not None and self.kept.dropped == dropped
            reason = _CLIENT_AWAY + (_KEPT if kept else "")
            self._answer_file(upstream, message.key, message.request, reason)
        else:  # under a number of the scheduler's (two nodes' may be the same)
            request = next(self._file_request_ids)
            # Kept with all it sends its client (keep_sent), unless over --max_kept
            # (to_client may answer it already: a file over a client's limit).
            kept = self.setup.recovery_id is not None and self.setup.keep_sent
            waiting = (upstream, message.key, message.request, kept)
            self.file_requests[request] = waiting
            backlog = self.session.backlog
            dropped = backlog.dropped if backlog is not None else 0
            kept_dropped = self.kept.dropped
            self.to_client(
                dataclasses.replace(message, request=request), buffers, job=job
            )
            if backlog is not None and backlog.dropped != dropped:
                # Over --max_kept for a client that does not read: no answer comes.
                self._answer_request(request, _NOT_READ)
            elif self.kept.dropped != kept_dropped and request in self.file_requests:
                self.file_requests[request] = (*waiting[:3], False)  # --max_kept

    def file_saved(self, message: FileSaved) -> None:
        """The client's answer about a file: to the node whose job waits for it."""
        self._answer_request(message.request, peer_text(message.error, 2000))

    def _answer_request(self, request: int, error: str) -> None:
        waiting = self.file_requests.pop(request, None)
        if waiting is not None:
            self._answer_file(*waiting[:3], error)

    def client_gone(self) -> None:
        """Its client went away: the files it did not answer for never will be;
        their jobs are told whether the scheduler kept them for its recovery."""
        for request in list(self.file_requests):
            upstream, key, asked, kept = self.file_requests.pop(request)
            self._answer_file(
                upstream, key, asked, _CLIENT_AWAY + (_KEPT if kept else "")
            )

    def client_replaced(self) -> None:
        """`recover_jobs` took it from a client still connected (a zombie): the
        files that client was sent and did not answer for never will be. A kept one
        goes to the new client with what was kept, which writes it and answers (its
        request stays open); the others were not kept (--max_kept): their jobs are
        told now."""
        for request, (upstream, key, asked, kept) in list(self.file_requests.items()):
            if not kept:
                del self.file_requests[request]
                self._answer_file(upstream, key, asked, _REPLACED)

    def _answer_file(
        self, upstream: Upstream, key: int, request: int, error: str
    ) -> None:
        if not upstream.closed:
            answer = FileSaved(
                comp_id=self.comp_id, key=key, request=request, error=error
            )
            self.server.write(upstream, answer)
