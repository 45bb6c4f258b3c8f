"""The disk under a node's kept-results spool (`nodeserver.spool`): files written
whole or not at all, flushed all at once, counted in whole blocks, and what its
errors mean for the results."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from typing import Any

#: Errors of a node short of memory, descriptors or disk space for a copy (its
#: limits, or the machine's): a result it cannot read for them is not lost.
SHORT = frozenset(
    {errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.EDQUOT}
)


def write_file(path: str, parts: list[Any]) -> None:
    """Write ``parts`` to ``path`` (mode 0600) via a temporary file and a rename
    (on the disk with the next `syncfs`): a crash leaves the whole file or none,
    and a partly written temporary one (`is_partial`)."""
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp"
    # A new file of its own: a FIFO a job made under that name was opened, and
    # the node waited for ever for a reader.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            for part in parts:
                handle.write(part)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def is_partial(name: str) -> bool:
    """Whether ``name`` is a file `write_file` writes before its rename in a spool:
    ``.r<...>.tmp`` (a result) or ``.meta.tmp``."""
    return name.endswith(".tmp") and (name.startswith(".r") or name == ".meta.tmp")


def why_not_written(exc: OSError) -> tuple[str, str]:
    """Why a kept result could not be written, and what gives room for more: a
    node's file size limit (``ulimit -f``, a batch system's) is not its disk."""
    if exc.errno == errno.EFBIG:
        return (
            f"{exc} (the node's file size limit, ulimit -f)",
            "have the node's file size limit (ulimit -f) raised",
        )
    return str(exc), "free space in the node's --dest-path, or let the node write there"


def syncfs(path: str) -> None:
    """Flush the file system ``path`` is on (all of it: one call for any number of
    files, where a sync of each file costs a flush of the disk each); raises OSError."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def _load_syncfs() -> Any:
    """libc's syncfs (Linux); None elsewhere."""
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _load_syncfs()


def block_size(path: str) -> int:
    """The allocation unit of the file system ``path`` is (or will be) on; 4 KiB if
    it cannot be told."""
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return max(os.statvfs(path).f_frsize, 512)
    except OSError:
        return 4096
