"""The node's directory (``--dest_path``): one lock that every node using it holds
(``--clean`` empties it only when no other node runs there), what killed nodes left
there swept, and its removal by a node whose parent went (``--remove-when-orphaned``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
from typing import TYPE_CHECKING

from dispynb import lockeddirs
from dispynb.errors import ConfigurationError
from dispynb.wording import counted, format_bytes
from nodeserver.leftovers import Removals
from nodeserver.privatedir import private_dir

if TYPE_CHECKING:
    from nodeserver.config import NodeConfig

logger = logging.getLogger("nodeserver")


#: The file in the destination directory that every node using it holds a shared
#: lock on while it runs (``--clean`` needs it exclusive).
DEST_LOCK = ".node-lock"


def use_dest_path(path: str, clean: bool, serving: bool) -> None:
    """Empty ``path`` first with ``clean``; if ``serving``, hold a shared lock on
    its `DEST_LOCK` until this process exits, after removing what nodes killed
    there left (`nodeserver.leftovers`: all of it if no other node runs there,
    else what the nodes gone noted).

    dispynode's ``--clean`` removes what a node that did not exit cleanly left;
    a node still running there would lose its computations' files, so ``clean``
    is refused while another node holds the lock (and a running scheduler's
    directory in it is left: `_empty`). A directory the node cannot
    write to is left to the server, which says what it cannot do there.
    """
    if clean and os.path.isdir(path):
        private_dir(path)  # not another user's, to open a lock in and remove
        fd = _open_lock(path)
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigurationError(
                    f"--clean: another dispynb-node is using {path}: stop it first, "
                    "or give this node a directory of its own (--dest_path_prefix)"
                ) from None
            finally:
                os.close(fd)  # the directory goes, the lock with it
        _empty(path)
    if serving:
        with contextlib.suppress(OSError):
            private_dir(path)  # before its lock is opened there
        fd = _open_lock(path)
        if fd is not None:  # released when this process (the node) exits
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # Another node runs here: what is noted may be its own; what
                # nodes gone left is not.
                Removals(path).sweep(alone=False)
            else:
                Removals(path).sweep()
            fcntl.flock(fd, fcntl.LOCK_SH)


def _empty(path: str) -> None:
    """``--clean``: remove what is in ``path``, and say what went, but not the
    directories in it that a running process holds (`lockeddirs.held`): a
    ``dispynb-scheduler``'s, whose default ``<tmp>/dispynb/scheduler`` is in the
    node's default. It lost its spill directory to a node's ``--clean`` there."""
    kept: list[str] = []
    for parent, dirs, _files in os.walk(path):
        for name in list(dirs):
            if lockeddirs.held(os.path.join(parent, name)):
                kept.append(os.path.join(parent, name))
                dirs.remove(name)  # not walked: it is left whole
    with contextlib.suppress(OSError):  # the nodes' lock: not a file to count
        os.unlink(os.path.join(path, DEST_LOCK))
    files, size = _remove_within(path, kept)
    logger.info(
        "--clean: removed %s (%s) in %s%s",
        counted(files, "file"),
        format_bytes(size),
        path,
        "".join(
            f"; left {where}: a running process uses it (a dispynb-scheduler's "
            "--dest_path_prefix?)"
            for where in kept
        ),
    )
    if not kept:
        with contextlib.suppress(OSError):  # made again by a node that serves
            os.rmdir(path)


def _remove_within(path: str, kept: list[str]) -> tuple[int, int]:
    """Remove what is in ``path`` but ``kept`` and the directories holding them;
    the files removed (links included) and their bytes."""
    files = size = 0
    with contextlib.suppress(OSError), os.scandir(path) as entries:
        for entry in list(entries):
            if entry.path in kept:
                continue
            if entry.is_dir(follow_symlinks=False):
                if any(k.startswith(entry.path + os.sep) for k in kept):
                    found = _remove_within(entry.path, kept)
                else:
                    found = _remove_within(entry.path, [])
                    with contextlib.suppress(OSError):
                        os.rmdir(entry.path)
                files, size = files + found[0], size + found[1]
                continue
            with contextlib.suppress(OSError):
                bytes_ = entry.stat(follow_symlinks=False).st_size
                os.unlink(entry.path)
                files, size = files + 1, size + bytes_
    return files, size


def _open_lock(path: str) -> int | None:
    """A descriptor of ``path``'s `DEST_LOCK` (made if missing); None if it cannot be
    had. Never through a symlink: one planted there (a job runs as the node's user)
    had the node create, or open and lock, the file it named."""
    lock = os.path.join(path, DEST_LOCK)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(2):
        try:
            fd = os.open(lock, flags, 0o600)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                return None
        else:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
        logger.warning("%s is not a file the node made (a symlink?): replaced", lock)
        with contextlib.suppress(OSError):
            os.unlink(lock)
    return None


def remove_files(config: NodeConfig) -> None:
    """Remove the node's directory, port file and Unix socket, then the directory
    holding them if it is left empty (``--remove-when-orphaned``: its parent made
    them for it, and is gone). Each node of a `LocalCluster` removes its own, so
    the last one to go removes their common directory."""
    shutil.rmtree(config.dest_path, ignore_errors=True)
    paths = [p for p in (config.port_file, config.unix_socket) if p]
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)
    for parent in {os.path.dirname(p) for p in [config.dest_path, *paths]}:
        with contextlib.suppress(OSError):  # not empty: another node's files
            os.rmdir(parent)


__all__ = ["DEST_LOCK", "remove_files", "use_dest_path"]
