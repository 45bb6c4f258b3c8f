"""The node's directory (``--dest-path``), made or taken only if no other user can
change it.

Its default, ``dispynb`` in the temporary directory, is a fixed name in a directory
every user may write to: another user can make it first, and the owner of a
directory may put files in it and rename (replace) anything in it, the node's own
subdirectories included. What the node keeps there is trusted: files by the digest
of their content, which jobs import, and results kept for clients, which clients
unpickle. So the directory and every directory above it must belong to the node's
user or root, and be writable by no one else unless sticky (``/tmp``: others may
add names there, not rename ours). The directory itself, if the node's user owns it,
is made private (mode 0700), once nothing in it belongs to another user.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import stat

from dispynb.errors import ConfigurationError

__all__ = ["private_dir"]

logger = logging.getLogger(__name__)

#: Why a directory cannot be made where a setting says: none of them passes.
_NOT_MADE_HERE = frozenset(
    {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EROFS, errno.ENOENT}
)


def private_dir(path: str, option: str = "--dest-path") -> None:
    """Make directory ``path`` (mode 0700) if it is missing; raise
    `ConfigurationError` saying why and what to do if another user could change it
    (``option`` names the setting that chose it), or if it cannot be made there."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        if exc.errno not in _NOT_MADE_HERE:
            raise  # a full disk, say: may pass
        # A setting that cannot work (exit 2: a service is not restarted for it),
        # said with its option, not as the OS's words alone.
        raise ConfigurationError(
            f"{option} {path}: cannot make this directory ({exc.strerror}"
            f"{'' if exc.filename in (None, path) else f': {exc.filename}'}): give "
            f"{option} a directory this user may create and write"
        ) from None
    path = os.path.abspath(path)
    # The directory checked is the one changed: by its descriptor, not its name
    # (which may be made to lead elsewhere meanwhile).
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if info.st_uid == os.geteuid() and info.st_mode & 0o077:
            # Ours but open to others (a tmpfs mounted there is 1777): made private,
            # as makedirs would have made it, once nothing in it is another's (below).
            os.fchmod(fd, 0o700)
            logger.info(
                "%s %s made private: mode 700 (was %o)",
                option,
                path,
                info.st_mode & 0o7777,
            )
    finally:
        os.close(fd)
    # The path as given (a symlink of another user could be replaced) and the
    # directories it leads to.
    for place in (path, os.path.realpath(path)):
        found = _unsafe(place)
        if found:
            where, why = found
            what = "it" if where == path else where
            raise ConfigurationError(
                f"{option} {path}: {what} {why}, so another user could replace "
                "what is kept there (files jobs run, results clients unpickle); "
                f"remove it (if it is not yours) or give {option} a directory of "
                "your own, writable by you only"
            )
    with os.scandir(path) as entries:  # made before it was private?
        for entry in entries:
            owner = entry.stat(follow_symlinks=False).st_uid
            if owner not in (os.geteuid(), 0):
                raise ConfigurationError(
                    f"{option} {path}: {entry.name} in it belongs to {_user(owner)}: "
                    "another user put it there, and the node would trust it; remove "
                    f"it, or give {option} a directory of your own"
                )


def _unsafe(path: str) -> tuple[str, str] | None:
    """Where and why another user could change what is at ``path`` (None: nobody
    can)."""
    me = os.geteuid()
    parts = path.split(os.sep)
    for depth in range(1, len(parts) + 1):
        place = os.sep.join(parts[:depth]) or os.sep
        info = os.lstat(place)
        if info.st_uid not in (me, 0):
            return place, f"belongs to {_user(info.st_uid)}"
        writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky = info.st_mode & stat.S_ISVTX and place != path
        if stat.S_ISDIR(info.st_mode) and writable and not sticky:
            return place, f"is writable by others (mode {info.st_mode & 0o7777:o})"
    return None


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
