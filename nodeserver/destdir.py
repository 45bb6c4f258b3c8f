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

from dispynb.errors import ConfigurationError
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
    is refused while another node holds the lock. A directory the node cannot
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
        shutil.rmtree(path, ignore_errors=True)
        logger.info("--clean: removed %s", path)
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
