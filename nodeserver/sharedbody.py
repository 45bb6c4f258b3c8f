"""Large client messages received into shared memory, handed to workers as is.

The node server reads the body of every large frame from a client straight into a
memfd mapping (`BodyPool.take`, installed as the client connection's
``decoder.take_body``). A job whose arguments lie in such a body goes to its worker
as the memfd (SCM_RIGHTS on the worker's Unix socket) and the offsets of its buffers
(`segments`); the worker maps it (`map_segments`) and unpickles from the mapping.
Before, the node server copied the arguments into the worker's socket and the worker
copied them out of it: two copies of every byte, and a zero-filled buffer in the
worker.

Fresh shared pages cost far more than a copy (each is faulted in and zeroed: tens of
milliseconds per 10 MB on a virtual machine), so bodies are used again once nothing
refers to them: no frame, no view of one, no job whose worker may still read it (a
job holds its body until it ends, `NodeJob.lease`), and no worker mapping that
outlived its job (`forget`). What the pool keeps is bounded (`KEEP_BYTES`), and let
go once the node is idle or has no client (`release`).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import threading
import weakref
from collections.abc import Sequence

#: Bodies from this size up are received into shared memory (smaller frames are
#: cheaper through the socket, and fill one read's chunk anyway).
MIN_SIZE = 1 << 20

#: Most bytes of bodies the pool keeps for reuse (busy and free together); bodies
#: beyond it are still shared, and freed as soon as nothing refers to them.
KEEP_BYTES = 96 << 20

#: Capacity of a new body is rounded up to this (one body then fits nearby sizes).
_ROUND = 1 << 20

#: Whether this platform has memfd (Linux).
AVAILABLE = hasattr(os, "memfd_create")


class SharedBody(mmap.mmap):
    """A memfd and its shared, writable mapping; ``fd`` is what a worker is sent.

    The descriptor is closed when the object is collected (with its mapping).
    """

    fd: int
    #: Address of the mapping's first byte, to find a view's offset.
    base: int

    @classmethod
    def create(cls, capacity: int) -> SharedBody:
        """A new body of ``capacity`` bytes (raises `OSError` when the system has
        no memory or descriptors to spare)."""
        fd = os.memfd_create("dispynb-body", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, capacity)
            body = cls(fd, capacity)
        except BaseException:
            os.close(fd)
            raise
        body.fd = fd
        weakref.finalize(body, os.close, fd)
        body.base = _address(body)
        return body


def _address(buffer: SharedBody | memoryview) -> int:
    """Address of a writable buffer's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _free_refs() -> int:
    """References to a pooled body that nobody else holds, as `BodyPool.take` sees
    them (the pool's, the loop variable's and getrefcount's)."""
    pool = [object()]
    for body in pool:
        return sys.getrefcount(body)
    raise AssertionError  # pragma: no cover


_FREE_REFS = _free_refs()


class BodyPool:
    """Shared bodies of large frames, taken again once nothing refers to them."""

    def __init__(self, keep_bytes: int = KEEP_BYTES) -> None:
        self.keep_bytes = keep_bytes
        self._bodies: list[SharedBody] = []
        self._kept = 0  # bytes of _bodies
        # Connections of several threads (in-process nodes in tests) share a pool.
        self._lock = threading.Lock()
        #: Large bodies taken so far: unchanged for a while means none arrived.
        self.taken = 0

    def take(self, size: int) -> bytearray | memoryview:
        """Writable memory of exactly ``size`` bytes for a frame's body: a view of
        a free shared body, of a new one, or (small frame, or no memfd to be had) a
        plain bytearray."""
        if size < MIN_SIZE:
            return bytearray(size)
        self.taken += 1
        best: SharedBody | None = None
        with self._lock:
            for body in self._bodies:
                if (
                    len(body) >= size
                    and (best is None or len(body) < len(best))
                    and sys.getrefcount(body) <= _FREE_REFS
                ):
                    best = body
        if best is None:
            capacity = -(-size // _ROUND) * _ROUND
            try:
                best = SharedBody.create(capacity)
            except OSError:
                return bytearray(size)  # the socket still works, at a copy's cost
            with self._lock:
                if self._kept + capacity <= self.keep_bytes:
                    self._bodies.append(best)
                    self._kept += capacity
        return memoryview(best)[:size]

    def forget(self, body: SharedBody) -> None:
        """Never take ``body`` again (a worker still maps it: its contents must not
        change under that worker's objects)."""
        with self._lock:
            if body in self._bodies:
                self._bodies.remove(body)
                self._kept -= len(body)

    def release(self) -> int:
        """Keep no body (the node is idle, or has no client left): free ones are
        freed now, busy ones as soon as nothing refers to them; the bytes kept."""
        with self._lock:
            kept, self._bodies, self._kept = self._kept, [], 0
        return kept

    @property
    def kept(self) -> int:
        """Bytes of the bodies the pool holds (busy or free)."""
        return self._kept

    def clear(self) -> None:
        """Forget every body (a forked child must not reuse its parent's)."""
        self._bodies = []
        self._kept = 0
        self._lock = threading.Lock()


#: The node server's pool (one per process).
BODIES = BodyPool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=BODIES.clear)


def segments(buffers: Sequence[memoryview]) -> tuple[SharedBody, list[int]] | None:
    """``(body, [offset, length, ...])`` if ``buffers`` all lie in one shared body,
    else None (they then travel through the socket)."""
    if not buffers:
        return None
    body = buffers[0].obj
    if type(body) is not SharedBody:
        return None
    out: list[int] = []
    for view in buffers:
        if view.obj is not body or not view.nbytes or view.readonly:
            return None
        if not view.c_contiguous:
            return None
        out.append(_address(view) - body.base)
        out.append(view.nbytes)
    return body, out


#: Most bytes of bodies a worker keeps mapped between jobs (`WorkerMappings`).
MAPPED_KEEP_BYTES = 64 << 20

#: /proc/self/pagemap: one 64-bit entry per page; in the entry's last byte, bit 7
#: says present, bit 6 swapped, bit 5 a file page (or shared memory): a private
#: mapping's page the process wrote to is present or swapped without bit 5.
_PAGEMAP = "/proc/self/pagemap"
_WRITTEN = bytes(1 if b & 0xC0 and not b & 0x20 else 0 for b in range(256))


class WorkerMappings:
    """A worker's mappings of the node's bodies, kept from one job to the next.

    Mapping 10 MB of shared memory and unmapping it costs a page-table entry per 4
    KiB page, several times the copy the unpickler makes from it (4-5 ms against
    0.5-1 ms per 10 MB on this machine). The node hands out the same few bodies
    again (`BodyPool`), so a worker keeps its mapping of a body (keyed by the
    memfd's inode, which the mapping keeps alive) and takes it again when that body
    comes back, with the node's new contents: pages nobody wrote to are the node's
    own pages. A mapping is kept only when it is pristine after its job: no object
    refers to it any more and the job wrote to none of its pages (a copy-on-write
    page, as a job changing a NumPy argument in place makes, would hide the node's
    next contents; `/proc/self/pagemap` tells). At most `MAPPED_KEEP_BYTES` are
    kept, the least recently used going first, and none once the worker is idle
    (`release`): a kept mapping holds its body's memory after the node let it go.
    """

    def __init__(self, keep_bytes: int = MAPPED_KEEP_BYTES) -> None:
        self.keep_bytes = keep_bytes
        self._kept: dict[tuple[int, int], mmap.mmap] = {}  # oldest first
        self._keys: dict[int, tuple[int, int]] = {}  # id(mapping) in use -> key
        self._sealed: set[int] = set()  # id(mapping) in use that no job can write to
        self._bytes = 0

    def map(self, fd: int, layout: Sequence[int]) -> tuple[mmap.mmap, list[memoryview]]:
        """The mapping of body ``fd`` (closed here) and views of the buffers
        ``layout`` (from `segments`) names: a kept one, else a new private one.

        The mapping is copy-on-write: an argument the job changes (a NumPy array
        made from a buffer) does not change the node's memory. Raises `ValueError`
        for a layout outside the body, `OSError` if it cannot be mapped.
        """
        try:
            stat = os.fstat(fd)
            size = stat.st_size
            if len(layout) % 2 or not layout:
                raise ValueError(f"malformed shared argument layout {list(layout)!r}")
            for offset, length in zip(layout[::2], layout[1::2], strict=True):
                if offset < 0 or length < 0 or offset + length > size:
                    raise ValueError(
                        f"shared argument {offset}+{length} lies outside its "
                        f"{size}-byte body"
                    )
            key = (stat.st_dev, stat.st_ino)
            mapping = self._kept.pop(key, None)
            if mapping is not None:
                self._bytes -= len(mapping)
                if len(mapping) != size:  # cannot happen: bodies never resize
                    mapping.close()
                    mapping = None
            if mapping is None:
                mapping = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        self._keys[id(mapping)] = key
        whole = memoryview(mapping)
        views = [
            whole[offset : offset + length]
            for offset, length in zip(layout[::2], layout[1::2], strict=True)
        ]
        whole.release()
        return mapping, views

    def seal(self, mapping: mmap.mmap, views: list[memoryview]) -> bool:
        """The job's arguments were unpickled from ``views`` (of ``mapping``), and
        it has not started: if no object took any of them (every argument is a
        copy, as a ``bytes`` one is), let them go. No buffer of the mapping is then
        left for the job to write through, so `done` need not read its pages'
        state (a page-table walk per 4 KiB page, a sixth of a worker's CPU per
        10 MB argument). True if sealed so."""
        for view in views:
            if sys.getrefcount(view) > _VIEW_REFS:
                return False  # an argument (or part of one) is this very view
        try:
            for view in views:
                view.release()
        except BufferError:  # a buffer was taken from it (counted above anyway)
            return False
        if _exported(mapping):
            return False  # a view made from one of them: it may still be written
        self._sealed.add(id(mapping))
        return True

    def done(self, mapping: mmap.mmap) -> bool:
        """The job that used ``mapping`` is over: keep it if pristine, else unmap it.

        False if some object still refers to it (an argument unpickled without a
        copy): it then stays mapped until that object goes, and the node must not
        use the body again."""
        key = self._keys.pop(id(mapping), None)
        sealed = id(mapping) in self._sealed
        self._sealed.discard(id(mapping))
        if _exported(mapping):
            return False
        if (
            key is not None
            and len(mapping) <= self.keep_bytes
            and key not in self._kept
            and (sealed or _pristine(mapping))
        ):
            self._kept[key] = mapping
            self._bytes += len(mapping)
            while self._bytes > self.keep_bytes:
                oldest = next(iter(self._kept))
                self._bytes -= len(self._kept[oldest])
                _close(self._kept.pop(oldest))
            return True
        mapping.close()
        return True

    @property
    def held(self) -> int:
        """Bytes of the mappings kept between jobs."""
        return self._bytes

    def forget(self) -> None:
        """Keep nothing, unmapping nothing (a forked child: they are its parent's)."""
        self._kept, self._keys, self._sealed, self._bytes = {}, {}, set(), 0

    def release(self) -> int:
        """Unmap every kept mapping (the worker is idle); their bytes."""
        kept, self._kept, held, self._bytes = self._kept, {}, self._bytes, 0
        for mapping in kept.values():
            _close(mapping)
        return held


def _close(mapping: mmap.mmap) -> None:
    """Unmap a kept mapping (one still in use, which `_exported` rules out, is left
    to the garbage collector rather than failing the worker)."""
    with contextlib.suppress(BufferError):
        mapping.close()


def _exported(mapping: mmap.mmap) -> bool:
    """Whether some buffer (a view, an object made from one) still uses ``mapping``.

    mmap does not say, but refuses to resize while it does: with BufferError first,
    and (no buffer) with TypeError for a copy-on-write mapping, which never
    resizes. Anything else means it cannot tell: not reused, as if it were used.
    """
    try:
        mapping.resize(len(mapping))
    except BufferError:
        return True
    except TypeError:
        return False
    return True  # pragma: no cover  (a copy-on-write mapping never resizes)


def _pristine(mapping: mmap.mmap) -> bool:
    """Whether no page of the private ``mapping`` was written to (copied on write)."""
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        pages = -(-len(mapping) // mmap.PAGESIZE)
        with open(_PAGEMAP, "rb", buffering=0) as pagemap:
            entries = os.pread(
                pagemap.fileno(), 8 * pages, address // mmap.PAGESIZE * 8
            )
    except (OSError, ValueError, TypeError):
        return False  # cannot tell: do not keep it
    if len(entries) != 8 * pages:
        return False
    return 1 not in entries[7::8].translate(_WRITTEN)


def _view_refs() -> int:
    """References to a view that only `WorkerMappings.seal`'s list holds, as it
    sees them (the list's, the loop variable's and getrefcount's)."""
    views = [memoryview(b"")]
    for view in views:
        return sys.getrefcount(view)
    raise AssertionError  # pragma: no cover


_VIEW_REFS = _view_refs()


#: The worker's kept mappings (one per process).
MAPPINGS = WorkerMappings()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=MAPPINGS.forget)


def map_segments(fd: int, layout: Sequence[int]) -> tuple[mmap.mmap, list[memoryview]]:
    """In a worker: `WorkerMappings.map` of the process's `MAPPINGS`."""
    return MAPPINGS.map(fd, layout)


def seal(mapping: mmap.mmap, views: list[memoryview]) -> bool:
    """In a worker, once the job's arguments are unpickled: `WorkerMappings.seal`
    of `MAPPINGS`."""
    return MAPPINGS.seal(mapping, views)


def unmap(mapping: mmap.mmap) -> bool:
    """In a worker, once the job is over: `WorkerMappings.done` of `MAPPINGS`."""
    return MAPPINGS.done(mapping)
