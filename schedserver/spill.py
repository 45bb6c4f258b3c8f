"""What the scheduler keeps for clients that went away, within bounds.

A computation with a recovery id (its client keeps a ``recover_file``) has the messages
meant for its client kept (`KeptMessages`) while the client is away (and, with
``keep_sent``, also those it was sent), for `recover_jobs`. Their payloads stay in
memory only while all computations together keep fewer than ``--kept_memory`` bytes
there (`SpillStore`); the rest go to one file per computation in the scheduler's
private spill directory (``mkdtemp`` under ``--dest_path_prefix``: mode 0700, files
0600 with random names, removed when the scheduler stops), read back one message at a
time as the client collects them.

Each computation may keep ``--max_kept`` bytes at most. Past that, a result is not
kept: its job's entry says so instead (an error the client sees, the job ends
``Terminated``; exactly one entry per job still), provisional results and files a job
sends are dropped (a warning is logged), and the computation gets no more CPUs while
its client is away (its queued jobs wait, nothing more is lost).

A client that journals its results (``ComputationSetup.ack_journaled``) says which
it has committed (`ResultsJournaled`): a kept message is dropped once every job it
concerns (its results and starts, a chunk's or a provisional result's job) is
acknowledged (`KeptMessages.journaled`), its memory given back, and the spill
file closed (its space freed) once nothing kept is on disk. What is not
acknowledged stays kept, as without acknowledgements.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import secrets
import shutil
import tempfile
from typing import Any

from dispynb.protocol.messages import (
    CRASHED,
    FileFromNode,
    JobProvisional,
    JobResults,
    Message,
    ResultChunk,
)
from dispynb.protocol.records import ResultEntry, is_start

logger = logging.getLogger(__name__)

#: A kept message: the message, its payload in memory (or None), and where on disk
#: the payload is (``(offset, size)`` per buffer; None while in memory).
_Kept = tuple[Message, list[memoryview] | None, list[tuple[int, int]] | None]


def _jobs_of(message: Message) -> set[tuple[int, int]]:
    """The jobs ``(key, attempt)`` a kept message concerns (empty: it is never
    dropped by acknowledgements; so a file a job sent, which names no attempt)."""
    if isinstance(message, JobResults):
        jobs = {
            (item[0], item[1])
            for item in message.results
            if isinstance(item, list)
            and len(item) > 1
            and type(item[0]) is int
            and type(item[1]) is int
        }
        jobs.update((s[0], s[1]) for s in message.started if is_start(s))
        return jobs
    if isinstance(message, ResultChunk | JobProvisional):
        return {(message.key, message.attempt)}
    return set()


class SpillStore:
    """The scheduler's budget of kept payload bytes in memory, and its directory for
    the rest (made on first use, removed by `close`)."""

    def __init__(self, prefix: str, memory: int) -> None:
        self.prefix = prefix
        self.memory = memory
        self.in_memory = 0
        self._dir: str | None = None

    def clean(self) -> int:
        """Remove the spill directories left by schedulers that were killed (their
        files were unlinked already: only empty directories remain); return how
        many."""
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.prefix):
                if entry.name.startswith("spill-") and entry.is_dir(
                    follow_symlinks=False
                ):
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed += 1
        return removed

    def directory(self) -> str:
        """The private spill directory (mode 0700), made now if needed."""
        if self._dir is None:
            os.makedirs(self.prefix, mode=0o700, exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix="spill-", dir=self.prefix)
        return self._dir

    def new_file(self) -> int:
        """A new spill file (mode 0600, a random name); its descriptor."""
        path = os.path.join(self.directory(), secrets.token_hex(16))
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        os.unlink(path)  # only its descriptor reaches it: gone with the process
        return fd

    def close(self) -> None:
        """Remove the spill directory."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class KeptMessages:
    """One computation's messages kept for its client, in order (see the module
    docstring); ``quota`` bytes of payload at most."""

    def __init__(
        self,
        store: SpillStore,
        name: str,
        quota: int,
        whose: str = "a client that went away",
    ) -> None:
        self.store = store
        self.name = name
        self.quota = quota
        #: Whom the messages wait for, as a dropped result's reason names it.
        self.whose = whose
        #: Payload bytes kept (in memory and on disk).
        self.size = 0
        #: Results, provisional results and files not kept (over the quota).
        self.dropped = 0
        #: Kept messages by their number, oldest first (one may leave from the
        #: middle: `journaled`).
        self._items: dict[int, _Kept] = {}
        self._numbers = itertools.count()
        self._fd: int | None = None
        self._end = 0  # where the next payload goes in the file
        self._in_memory = 0
        self._dropped_streams: set[tuple[int, int]] = set()
        #: With acknowledgements (`track`): per job ``(key, attempt)`` the kept
        #: messages that concern it, and per message how many of its jobs are not
        #: acknowledged yet.
        self.tracking = False
        self._waiting: dict[tuple[int, int], list[int]] = {}
        self._unacked: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    @property
    def on_disk(self) -> int:
        """Payload bytes kept on disk."""
        return self.size - self._in_memory

    @property
    def full(self) -> bool:
        """Something was not kept since the client last collected."""
        return bool(self._dropped_streams) or self.dropped > 0

    def add(self, message: Message, buffers: list[memoryview]) -> None:
        """Keep ``message`` (its payload in memory, or on disk) within the quota."""
        size = sum(b.nbytes for b in buffers)
        if self.size + size > self.quota or (
            isinstance(message, JobResults) and self._dropped_streams
        ):
            message, buffers = self._over_quota(message, buffers)
            if message is None:
                return
            size = sum(b.nbytes for b in buffers)
        self.size += size
        store = self.store
        number = next(self._numbers)
        if not buffers or store.in_memory + size <= store.memory:
            store.in_memory += size
            self._in_memory += size
            self._items[number] = (message, list(buffers), None)
        else:
            self._items[number] = (message, None, self._write(buffers))
        if self.tracking:
            jobs = _jobs_of(message)
            if jobs:
                self._unacked[number] = len(jobs)
                for job in jobs:
                    self._waiting.setdefault(job, []).append(number)

    def journaled(self, jobs: list[Any]) -> int:
        """The client journaled these jobs (``[key, attempt]`` each): drop the
        kept messages that concern only jobs it journaled; how many were dropped.
        Anything else (a job not kept, garbage) is ignored."""
        dropped = 0
        for item in jobs:
            if not (
                isinstance(item, list)
                and len(item) == 2
                and all(type(n) is int for n in item)
            ):
                continue
            for number in self._waiting.pop((item[0], item[1]), ()):
                left = self._unacked.get(number)
                if left is None:
                    continue  # sent to a recovering client already
                if left > 1:
                    self._unacked[number] = left - 1
                    continue
                del self._unacked[number]
                self._drop(number)
                dropped += 1
        if dropped and self._fd is not None and self.size == self._in_memory:
            self._close_file()  # nothing kept on disk any more: its space freed
        return dropped

    def _drop(self, number: int) -> None:
        _message, buffers, places = self._items.pop(number)
        if buffers is not None:
            size = sum(b.nbytes for b in buffers)
            self._in_memory -= size
            self.store.in_memory -= size
        else:
            assert places is not None
            size = sum(length for _offset, length in places)
        self.size -= size

    def pop(self) -> tuple[Message, list[memoryview]]:
        """The oldest kept message and its payload (read back from disk if there)."""
        number = next(iter(self._items))
        message, buffers, places = self._items.pop(number)
        self._unacked.pop(number, None)
        if buffers is None:
            assert places is not None and self._fd is not None
            buffers = [self._read(offset, size) for offset, size in places]
        size = sum(b.nbytes for b in buffers)
        self.size -= size
        if places is None:
            self._in_memory -= size
            self.store.in_memory -= size
        if not self._items:
            self._reset()
        return message, buffers

    def clear(self) -> None:
        """Drop everything kept (the computation closed)."""
        self._items.clear()
        self.size = 0
        self._reset()

    def _reset(self) -> None:
        self.store.in_memory -= self._in_memory
        self._in_memory = 0
        self.dropped = 0
        self._dropped_streams.clear()
        self._waiting.clear()
        self._unacked.clear()
        self._close_file()

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._end = 0

    def _write(self, buffers: list[memoryview]) -> list[tuple[int, int]]:
        if self._fd is None:
            self._fd = self.store.new_file()
        places = []
        for buffer in buffers:
            offset, view = self._end, buffer.cast("B") if buffer.ndim != 1 else buffer
            written = 0
            while written < view.nbytes:
                written += os.pwrite(self._fd, view[written:], offset + written)
            places.append((offset, view.nbytes))
            self._end += view.nbytes
        return places

    def _read(self, offset: int, size: int) -> memoryview:
        data = bytearray(size)
        view = memoryview(data)
        done = 0
        while done < size:
            count = os.preadv(self._fd, [view[done:]], offset + done)  # type: ignore[arg-type]
            if count <= 0:
                raise OSError(f"spill file of {self.name} ended early")
            done += count
        return view

    def _over_quota(
        self, message: Message, buffers: list[memoryview]
    ) -> tuple[Any, list[memoryview]]:
        """What is kept of a message that does not fit: results become an error
        entry each, other payloads are dropped (None)."""
        if isinstance(message, ResultChunk):
            self._warn("a large result")
            self._dropped_streams.add((message.key, message.attempt))
            return None, []
        if isinstance(message, JobProvisional | FileFromNode):
            self._warn("a provisional result or a file a job sent")
            self.dropped += 1
            return None, []
        if not isinstance(message, JobResults):
            return message, buffers
        results: list[Any] = []
        kept: list[memoryview] = []
        offset = 0
        room = self.quota - self.size
        for item in message.results:
            entry, streamed = ResultEntry.from_wire(item)
            count = 0 if streamed else entry.buffer_count
            own = buffers[offset : offset + count]
            offset += count
            size = sum(b.nbytes for b in own)
            stream = (entry.key, entry.attempt)
            if stream not in self._dropped_streams and size <= room:
                results.append(item)
                kept.extend(own)
                room -= size
                continue
            self._warn("a result")
            self._dropped_streams.discard(stream)
            self.dropped += 1
            reason = (
                "its result was not kept: the scheduler keeps at most "
                f"{self.quota / 2**20:.0f} MiB of results for {self.whose} "
                "(--max_kept); collect them sooner, or have it raised"
            )
            results.append(
                entry._replace(
                    outcome=CRASHED, exception=reason, buffer_count=0
                ).to_wire()
            )
        return dataclasses.replace(message, results=results), kept

    def _warn(self, what: str) -> None:
        if not self.full:
            logger.warning(
                "%s: %s was not kept for its client: it keeps %.1f MiB already "
                "(--max_kept); its queued jobs wait for the client",
                self.name,
                what,
                self.size / 2**20,
            )


__all__ = ["KeptMessages", "SpillStore"]
