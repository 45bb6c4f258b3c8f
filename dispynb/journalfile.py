"""That SQLite uses the very journal file `dispynb.journal` checked.

The journal's file is checked (ours, not a symlink) through a descriptor, then
SQLite opens it again by its path: in a directory others can write to, a symlink to
a file of theirs put there in between (and taken away at once) was followed, and
their file got the jobs' arguments and results, and what ``recover_jobs`` unpickles.
Comparing the path's inode after SQLite opened it would miss such a swap there and
back; SQLite cannot be given a descriptor, nor a ``/proc/self/fd`` path (its ``-wal``
and ``-shm`` files are named after the path). So `refuse_swapped` looks at what the
process has open instead (``/proc/self/fd``): SQLite's descriptor must be one of the
checked file itself. (A lock probe, fcntl ``F_OFD_GETLK``, would tell too, but names
one holder only: another process reading the journal hides this one's lock.)

Closing any descriptor of a file drops every fcntl lock the process holds on it,
SQLite's included (the SHARED lock a WAL connection keeps while open): so the checked
descriptors stay open (`pin`) until no journal of the process has the file open.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable

from dispynb.errors import ConfigurationError

#: (st_dev, st_ino) -> the journals open on the file, and its checked descriptors
_pinned: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
_pinned_lock = threading.Lock()


def pin(fd: int) -> Callable[[], None]:
    """Keep ``fd`` open while a journal uses its file; return what the journal calls
    once it closed its database (idempotent). The descriptors of a file are closed
    together, once the last journal of the process on it let go."""
    key = _identity(os.fstat(fd))
    with _pinned_lock:
        users, fds = _pinned.setdefault(key, ([0], []))
        users[0] += 1
        fds.append(fd)
    released = threading.Event()

    def release() -> None:
        with _pinned_lock:
            if released.is_set():
                return
            released.set()
            users[0] -= 1
            if users[0]:
                return
            del _pinned[key]
        for each in fds:
            os.close(each)

    return release


def refuse_swapped(path: str, db: sqlite3.Connection, checked: int) -> None:
    """Raise `ConfigurationError` unless the file SQLite opened by ``path`` (``db``)
    is the one checked (``checked``, a pinned descriptor).

    Passes if a descriptor of this process, not a checked one, is of that file. So
    another connection of this process to the same journal (``recover_jobs`` while
    the cluster writes it) would pass for ``db``'s: a swap then goes unseen (it
    takes that, and a directory others can write to). Without ``/proc`` (not Linux),
    the path's inode is compared after the fact.
    """
    db.execute("SELECT count(*) FROM sqlite_master").fetchall()  # it is open
    key = _identity(os.fstat(checked))
    if not os.path.isdir("/proc/self/fd"):
        now = os.stat(path, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == key:
            return
    else:
        with _pinned_lock:
            checked_fds = set(_pinned[key][1])
        for name in os.listdir("/proc/self/fd"):
            if int(name) in checked_fds:
                continue
            with contextlib.suppress(OSError):  # closed since (listdir's own, say)
                if _identity(os.stat(f"/proc/self/fd/{name}")) == key:
                    return
    raise ConfigurationError(
        f"recover_file {path!r} was replaced (by a symlink?) as it was opened: someone "
        "who can write to its directory may be at it; give a recover_file in a "
        "directory of your own"
    )


def _identity(info: os.stat_result) -> tuple[int, int]:
    return (info.st_dev, info.st_ino)
