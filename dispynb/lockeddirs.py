"""Temporary directories that a process ``flock``-s for as long as it uses them.

A client killed with its nodes (SIGKILL to a batch job's whole cgroup, the
out-of-memory killer) removes none of its temporary files, and nothing else would.
So each such directory is locked (``flock`` on the directory itself) by the process
that made it, and the next one to make a directory of the same kind removes those
whose lock nobody holds: their owner has ended. The kernel lets a lock go only when
the last descriptor sharing it closes, which a pid could not tell: in another pid
namespace (a container sharing the temporary directory) it names another process,
or none. Only this user's directories are removed, never one reached by a link;
with each, the job results in shared memory named after its directories (those
its nodes' workers wrote for the killed client).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile

from dispynb.protocol import shm


def make(prefix: str) -> tuple[str, int]:
    """A new directory ``<tmp>/<prefix>*`` and the descriptor holding its lock
    (close it once the directory is removed), once the directories of ``prefix``
    whose owners have ended are removed. ``prefix`` must be used by this module
    only: an unlocked directory of that name is taken as abandoned."""
    parent = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            if name.startswith(prefix):
                _remove_if_unlocked(os.path.join(parent, name))
    for _ in range(8):
        path = tempfile.mkdtemp(prefix=prefix)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Another process's sweep may have found it before it was locked, and
            # removed it: then make another.
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                return path, fd
        except OSError:
            pass
        os.close(fd)
    raise OSError(f"cannot make a directory {prefix}* in {parent}")


def _remove_if_unlocked(path: str) -> None:
    """Remove the directory ``path`` if it is this user's (not a link to one) and
    no process holds its lock (the process that made it has ended)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        if os.fstat(fd).st_uid == os.getuid():
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _unlink_results_within(path)
            shutil.rmtree(path, ignore_errors=True)
    except OSError:  # locked: its owner runs
        pass
    finally:
        os.close(fd)


def _unlink_results_within(path: str) -> None:
    """Unlink the job results in shared memory named after a directory under
    ``path`` (`shm.result_prefix`: a computation's, on a LocalCluster's node):
    passed on to a client killed with its nodes, or written for it, nobody else
    reads or unlinks them, and they stayed in RAM until the machine rebooted."""
    prefixes = {
        shm.result_prefix(os.path.join(parent, name))
        for parent, names, _files in os.walk(path)
        for name in names
    }
    if prefixes:
        shm.unlink_results(tuple(prefixes))


def hold(path: str) -> int:
    """A descriptor holding a shared lock on the directory ``path`` (close it to let
    go): says to `held` that a process uses the directory (a `dispynb-scheduler`'s
    ``--dest_path_prefix``, which a node's ``--clean`` of a directory around it,
    the node's default ``<tmp>/dispynb`` holding the scheduler's, leaves)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def held(path: str) -> bool:
    """Whether a process holds a lock on the directory ``path`` (`hold`, `make`);
    False for what is not a directory, or a link to one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # its lock, if it had one, with it
    return False
