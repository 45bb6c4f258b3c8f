"""`JobQueue`: a computation's jobs waiting at the scheduler, in order, found by
key in one step.

A cancel looked for its job through the whole queue in Python: a user with
200,000 jobs queued who cancelled 3,000 keys not queued held the scheduler's loop
for seconds, and another user's client could not finish its handshake (5 s).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from schedserver.computation import QueuedJob


class JobQueue(collections.deque["QueuedJob"]):
    """A deque of queued jobs that knows which key is queued (`find`). Its
    mutators are the deque's `append`, `appendleft`, `popleft`, `remove` and
    `clear`, each keeping the index; others (``del``) must not be used."""

    def __init__(self) -> None:
        super().__init__()
        self._by_key: dict[int, QueuedJob] = {}

    def find(self, key: int) -> QueuedJob | None:
        """The queued job of ``key`` (None: none is queued)."""
        return self._by_key.get(key)

    def append(self, job: QueuedJob) -> None:
        super().append(job)
        self._by_key[job.key] = job

    def appendleft(self, job: QueuedJob) -> None:
        super().appendleft(job)
        self._by_key[job.key] = job

    def popleft(self) -> QueuedJob:
        job = super().popleft()
        self._forget(job)
        return job

    def remove(self, job: QueuedJob) -> None:
        super().remove(job)
        self._forget(job)

    def clear(self) -> None:
        super().clear()
        self._by_key.clear()

    def _forget(self, job: QueuedJob) -> None:
        # (a client's job queued twice under one key is found once)
        if self._by_key.get(job.key) is job:
            del self._by_key[job.key]
