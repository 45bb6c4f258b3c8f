"""One large object used by many jobs: ``ref = cluster.put(obj)`` (issue 17, W7).

``JobCluster.put`` pickles an object once into a file of the client's, named by its
content digest, and returns an `ObjectRef`. A job receives the handle as an argument
(anywhere inside its arguments) and gets the object itself: the handle unpickles as
the object. The object travels as one of the job's files, which each node receives
once per connection and keeps in its file store by digest (dispy's ``depends``
machinery: the client sends a file to a node only once). On the node, each worker
process loads it the first time a job needs it and keeps it for the computation's
later jobs (`resolve`); large buffers (a NumPy array's memory) are mapped from the
node's copy, not copied. The node removes its copy when the computation closes, and
the client removes its file when the cluster closes; the files of a client killed
first (SIGKILL, the out-of-memory killer) go at the next client's first put
(`make_directory`), told by the ``flock`` a live client holds on its directory.

Only for the node backend (``JobCluster(nodes=...)``): on Ray, ``ray.put``'s
handles are given to jobs as arguments; Dask's ``scatter`` cannot reach the jobs
(`dispynb.backends.dask.DaskEngine.instead` says what to do instead).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from typing import Any

from dispynb import lockeddirs
from dispynb.depends import FileRef
from dispynb.errors import ClusterError, SerializationError
from dispynb.protocol import serialize

__all__ = [
    "OBJECTS_DIR",
    "ObjectRef",
    "collecting",
    "is_object_file",
    "load",
    "resolve",
    "write",
]

#: Where the object files go in the computation's directory on a node.
OBJECTS_DIR = ".dispynb-objects"
_MAGIC = b"dispynb-object-1\n"


def is_object_file(relative: str) -> bool:
    """Whether a job's file (by its path in the computation's directory) is an
    object put in the cluster: it stays on a node for the cluster's life (sent
    once), not only while the jobs that use it run."""
    return relative.startswith(OBJECTS_DIR + "/")


_COUNT = struct.Struct("<I")
_SIZE = struct.Struct("<Q")

# Objects loaded by this process, by digest (a worker's cache, kept for the
# computation's later jobs), and those `put` by this client (while its cluster is
# open), so that a handle coming back in a result unpickles here too.
_cache: dict[str, Any] = {}
_local: dict[str, Any] = {}
_collector = threading.local()


@dataclass(frozen=True, slots=True)
class _ObjectFile(FileRef):
    """The client's object file: written by dispynb itself and never changed, so it
    is read without hashing it again for every node."""

    def read(self) -> bytes:
        with open(self.path, "rb") as handle:
            return handle.read()


class ObjectRef:
    """A handle to an object put in a cluster with `JobCluster.put`.

    Pass it to jobs in place of the object (in their arguments, at any depth); each
    node receives the object once, and a job sees the object itself. ``size`` is the
    pickled size in bytes, ``digest`` its SHA-256.
    """

    __slots__ = ("_file", "digest", "size")

    def __init__(self, file: FileRef) -> None:
        self._file = file
        self.digest = file.digest
        self.size = file.size

    @property
    def file(self) -> FileRef:
        """The file that carries the object to the nodes."""
        return self._file

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        refs = getattr(_collector, "refs", None)
        if refs is not None:
            refs.append(self)
        return resolve, (self.digest,)

    def __repr__(self) -> str:
        return f"<ObjectRef {self.digest[:12]} ({self.size:,} bytes)>"


class collecting:
    """Collect the `ObjectRef` s pickled in this thread inside the block.

    A class, not a generator context manager: entered at every job submitted.
    """

    __slots__ = ("_previous",)

    def __enter__(self) -> list[ObjectRef]:
        self._previous = getattr(_collector, "refs", None)
        refs: list[ObjectRef] = []
        _collector.refs = refs
        return refs

    def __exit__(self, *exc: object) -> None:
        _collector.refs = self._previous


#: A client's directory of object files: ``dispynb-objects-flock-*`` in the
#: temporary directory, ``flock``-ed by the process that made it for as long as it
#: uses it (`_held`). Older names (``dispynb-objects-PID-START-*``) are left alone.
_DIR_PREFIX = "dispynb-objects-flock-"

#: This process's directories and the descriptor holding each one's lock.
_held: dict[str, int] = {}
_held_lock = threading.Lock()


def make_directory() -> str:
    """A new directory for this process's object files, once those of clients
    that ended without removing theirs are removed (a kernel killed: SIGKILL, the
    out-of-memory killer; nothing else would remove them, large as they may be).
    `remove_directory` removes it. Whether a client ended is told by the lock it
    holds on its directory (`dispynb.lockeddirs`).
    """
    path, fd = lockeddirs.make(_DIR_PREFIX)
    with _held_lock:
        _held[path] = fd
    return path


def remove_directory(path: str) -> None:
    """Remove a directory of `make_directory`'s, and let its lock go."""
    shutil.rmtree(path, ignore_errors=True)
    with _held_lock:
        fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


def write(obj: Any, directory: str) -> ObjectRef:
    """Pickle ``obj`` into a new file in ``directory``; its handle.

    Raises `SerializationError` if ``obj`` cannot be pickled.
    """
    buffers = [memoryview(b).cast("B") for b in serialize.dumps(obj)]
    header = _MAGIC + _COUNT.pack(len(buffers))
    header += b"".join(_SIZE.pack(b.nbytes) for b in buffers)
    digest = hashlib.sha256(header)
    for buffer in buffers:
        digest.update(buffer)
    name = digest.hexdigest()
    path = os.path.join(directory, name)
    size = len(header) + sum(b.nbytes for b in buffers)
    if not os.path.exists(path):
        _write_file(path, [header, *buffers], size)
    _local[name] = obj
    relative = f"{OBJECTS_DIR}/{name}"
    return ObjectRef(_ObjectFile(path, relative, name, size))


def _write_file(path: str, parts: list[bytes | memoryview], size: int) -> None:
    """Write ``parts`` (``size`` bytes in all) to ``path`` whole, or raise
    `ClusterError` saying why, leaving nothing.

    Through a temporary file of this thread's: the file of a write that failed (a
    full disk) stayed, keeping the disk full until the cluster closed, and two
    threads putting one object wrote (truncated) one temporary file.
    """
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.part"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with open(os.open(tmp, flags, 0o600), "wb") as handle:
            for part in parts:
                handle.write(part)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        directory = os.path.dirname(path)
        raise ClusterError(
            f"cannot put the object: its file of {size} bytes in {directory} cannot "
            f"be written ({exc.strerror or exc}); free room on that disk, or set "
            "TMPDIR to a directory on a disk with room"
        ) from None


def forget(ref: ObjectRef) -> None:
    """The client's cluster closed: drop its reference to the object."""
    _local.pop(ref.digest, None)


def unload(digest: str) -> None:
    """In a worker: let go of the object `resolve` loaded for ``digest`` (kept for
    the computation's later jobs otherwise); a later use loads it again."""
    _cache.pop(digest, None)


def load(path: str) -> Any:
    """Unpickle an object file (its large buffers mapped, not copied)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise SerializationError(f"object file {path} is empty")
        mapped = mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_PRIVATE)
    whole = memoryview(mapped)
    try:
        if bytes(whole[: len(_MAGIC)]) != _MAGIC:
            raise SerializationError(f"{path} is not a dispynb object file")
        offset = len(_MAGIC)
        (count,) = _COUNT.unpack_from(whole, offset)
        offset += _COUNT.size
        sizes = [
            _SIZE.unpack_from(whole, offset + i * _SIZE.size)[0] for i in range(count)
        ]
        offset += count * _SIZE.size
        if offset + sum(sizes) != whole.nbytes:
            raise SerializationError(f"object file {path} is truncated")
        views = []
        for size in sizes:
            views.append(whole[offset : offset + size])
            offset += size
        return serialize.loads(views)
    except struct.error as exc:
        raise SerializationError(f"object file {path} is truncated") from exc


def resolve(digest: str) -> Any:
    """The object a handle names (called when a job's arguments are unpickled).

    In a worker: loaded from the computation's directory on the first use, then
    kept for the computation's later jobs. In the client: the object it put.
    """
    try:
        return _cache[digest]
    except KeyError:
        pass
    if digest in _local:
        return _local[digest]
    path = os.path.join(OBJECTS_DIR, digest)
    try:
        value = load(path)
    except FileNotFoundError:
        raise SerializationError(
            f"object {digest[:12]} is not on this node (was it put in another"
            " cluster, or that cluster closed?)"
        ) from None
    _cache[digest] = value
    return value
