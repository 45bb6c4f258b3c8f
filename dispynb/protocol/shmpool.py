"""The client's pool of reusable shared memory segments for large job arguments.

Writing 10 MB into a fresh ``/dev/shm`` object costs the client a page allocation per
4 KiB page (8-10 ms measured, against about 1 ms to rewrite pages already mapped):
more than everything else a large job costs it. So a `SegmentPool` keeps the segments
of jobs that ended and writes the next job's arguments into one of them.

Safety, segment by segment (see `dispynb.protocol.shm` for the reference format):

- A segment is created without a name (``O_TMPFILE``, mode 0600), locked with
  ``flock`` and only then linked under ``dnb-<128 random bits>``; the client holds the
  lock until it unlinks the segment. A name without a lock holder is an orphan (its
  client died): `dispynb.protocol.shm.sweep` removes those.
- Every job gets the segment under a new random name; when the job ends the segment
  is renamed again before it idles in the pool, so a name a node saw never opens it
  after that job.
- Workers copy the arguments out of the segment before the job runs
  (`dispynb.protocol.shm.load_reference`), so rewriting it for a later job cannot
  change an earlier job's arguments.
- The pool is bounded (`MAX_IDLE` segments, `MAX_IDLE_BYTES`); anything beyond is
  unlinked when its job ends, and `close` unlinks all.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from dispynb.protocol.framing import Buffer
from dispynb.protocol.shm import SHM_DIR, check_room, make_reference

__all__ = ["MAX_IDLE", "MAX_IDLE_BYTES", "SegmentPool"]

#: Idle segments kept for reuse, and their total size at most.
MAX_IDLE = 8
MAX_IDLE_BYTES = 256 * 1024 * 1024
#: Segment sizes are rounded up to this, so that similar payloads share segments.
GRANULE = 1024 * 1024


@dataclass(slots=True, eq=False)
class _Segment:
    fd: int
    name: str
    capacity: int
    #: Mapped at its first reuse (its first job's arguments are written with
    #: ``pwrite``, which allocates its pages without faulting or zeroing them).
    mapped: mmap.mmap | None = None
    #: Bytes from the start whose pages the file system gave (written or
    #: allocated); the rest of ``capacity`` is a hole.
    allocated: int = 0


def _pwrite(fd: int, views: Sequence[memoryview]) -> None:
    """Write ``views`` one after the other from the start of ``fd`` (the GIL is
    released meanwhile)."""
    offset = 0
    for view in views:
        while view:
            count = os.pwrite(fd, view, offset)
            view = view[count:]
            offset += count


def _new_name() -> str:
    return f"dnb-{secrets.token_hex(16)}"


class SegmentPool:
    """Shared memory segments of one client computation (runs on its I/O loop).

    `write` puts a job's buffers into a segment and returns the name and the reference
    to send; `release` takes it back when the job ended (``reuse=False``: unlink it,
    for a job that may still be read: cancelled, abandoned); `close` unlinks all.
    """

    def __init__(
        self, max_idle: int = MAX_IDLE, max_idle_bytes: int = MAX_IDLE_BYTES
    ) -> None:
        self.max_idle = max_idle
        self.max_idle_bytes = max_idle_bytes
        self._dir: int | None = None
        self._idle: list[_Segment] = []
        self._busy: dict[str, _Segment] = {}
        #: Segments created and reuses, for tests and diagnostics.
        self.created = 0
        self.reused = 0

    def write(self, buffers: Sequence[Buffer]) -> tuple[str, bytes]:
        """Copy ``buffers`` into a segment under a new name; the name and reference.

        Raises `OSError` if ``/dev/shm`` cannot hold them with room to spare for other
        programs (`check_room`): nothing is left behind, and the idle segments are
        unlinked too (their room is wanted).
        """
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(v.nbytes for v in views)
        segment = self._take(total)
        try:
            if total > segment.allocated:
                check_room(total - segment.allocated)
            if segment.allocated:
                self._copy(segment, views, total)
            else:
                _pwrite(segment.fd, views)
            segment.allocated = max(segment.allocated, total)
            name = _new_name()
            os.rename(segment.name, name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
            segment.name = name
        except BaseException as exc:
            self._destroy(segment)
            if isinstance(exc, OSError):
                self._drop_idle()
            raise
        self._busy[name] = segment
        return name, make_reference(name, views)

    @staticmethod
    def _copy(segment: _Segment, views: Sequence[memoryview], total: int) -> None:
        """Rewrite a segment's pages, mapped once (a copy in memory costs a quarter
        of a ``pwrite`` into pages that exist; mapping them costs about one).

        Pages past the ones written before are allocated first: through the mapping,
        a page a full tmpfs cannot give is SIGBUS, the end of the client; here it is
        `OSError` (ENOSPC).
        """
        if total > segment.allocated:
            os.posix_fallocate(segment.fd, segment.allocated, total - segment.allocated)
        if segment.mapped is None:
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            segment.mapped = mmap.mmap(segment.fd, segment.capacity, flags=flags)
        offset = 0
        for view in views:
            segment.mapped[offset : offset + view.nbytes] = view
            offset += view.nbytes

    def release(self, name: str, reuse: bool = True) -> None:
        """The job that used segment ``name`` ended: keep it for reuse (renamed, so
        the job's name opens nothing any more) or, over the bounds, unlink it."""
        segment = self._busy.pop(name, None)
        if segment is None:
            return
        if not reuse or not segment.capacity or not self._keep(segment):
            self._destroy(segment)
            return
        try:
            idle = _new_name()
            os.rename(segment.name, idle, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        except OSError:  # its name was removed (a sweep, a node): not reusable
            self._destroy(segment)
            return
        segment.name = idle
        self._idle.append(segment)

    def close(self) -> None:
        """Unlink every segment, idle or in use (the cluster is closing)."""
        for segment in [*self._idle, *self._busy.values()]:
            self._destroy(segment)
        self._idle.clear()
        self._busy.clear()
        if self._dir is not None:
            os.close(self._dir)
            self._dir = None

    def names(self) -> list[str]:
        """The current names of all segments (idle ones included)."""
        return [s.name for s in [*self._idle, *self._busy.values()]]

    def _drop_idle(self) -> None:
        """Unlink the idle segments (``/dev/shm`` is short of room)."""
        for segment in self._idle:
            self._destroy(segment)
        self._idle.clear()

    def _keep(self, segment: _Segment) -> bool:
        if len(self._idle) >= self.max_idle:
            return False
        idle_bytes = sum(s.capacity for s in self._idle)
        return idle_bytes + segment.capacity <= self.max_idle_bytes

    def _take(self, size: int) -> _Segment:
        """The smallest idle segment that holds ``size`` bytes, or a new one."""
        fits = [s for s in self._idle if s.capacity >= size]
        if fits:
            segment = min(fits, key=lambda s: s.capacity)
            self._idle.remove(segment)
            self.reused += 1
            return segment
        return self._create(size)

    def _create(self, size: int) -> _Segment:
        if self._dir is None:
            self._dir = os.open(SHM_DIR, os.O_RDONLY | os.O_DIRECTORY)
        capacity = -(-size // GRANULE) * GRANULE
        # Nameless until locked: a sweep never sees a live segment without its lock.
        fd = os.open(SHM_DIR, os.O_TMPFILE | os.O_RDWR, 0o600)
        segment = _Segment(fd, "", capacity)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, capacity)
            name = _new_name()
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=self._dir)
            segment.name = name
        except BaseException:
            self._destroy(segment)
            raise
        self.created += 1
        return segment

    def _destroy(self, segment: _Segment) -> None:
        if segment.name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(segment.name, dir_fd=self._dir)
            segment.name = ""
        if segment.mapped is not None:
            with contextlib.suppress(BufferError):
                segment.mapped.close()
            segment.mapped = None
        if segment.fd >= 0:
            os.close(segment.fd)
            segment.fd = -1
