"""Per-user credentials of the shared scheduler: the users file and credentials.

The users file (mode 0600, one ``NAME TOKEN`` line per user) is the scheduler's;
each user gets a credential ``dispynb-user:NAME:TOKEN`` (a file of mode 0600) that their
`SharedJobCluster` proves in the handshake, as a node's clients prove the node
secret. Revoking a user removes the line: the scheduler reloads the file when it
changes and ends that user's sessions. A file removed once read is not "no users":
the users read before are kept until it is back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from dispynb.daemon import replace_file
from dispynb.errors import ConfigurationError
from dispynb.secret import foreign_owner

#: What a user name may be: it appears in logs and on the nodes.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_name(name: str) -> str:
    """``name`` if it is a valid user name; otherwise `ConfigurationError`."""
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigurationError(
            f"invalid user name {name[:80]!r}: use 1-64 letters, digits, '_', '.' "
            "or '-'"
        )
    return name


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by its owner only."""
    replace_file(str(path), text, 0o600)


class UsersFile:
    """The scheduler's users: name -> token, from a file of mode 0600."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._users: dict[str, bytes] = {}
        self._stamp: tuple[int, ...] | None = None

    def load(self) -> dict[str, bytes]:
        """Read the file (again, if it changed); return name -> token."""
        # One descriptor, checked then read: by path, the file checked and the one
        # read could differ (swapped in between, or a symlink to another file).
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            if self._stamp is not None:
                # Removed by mistake (or by a tool that writes it anew in two
                # steps): every user's session would end at once. Revoking is
                # explicit (`revoke`, or an empty file); a missing one is trouble.
                raise ConfigurationError(
                    f"{self.path} was removed: restore it (the users read before "
                    "are kept meanwhile); to revoke every user, leave an empty file "
                    "or run 'dispynb-scheduler user revoke NAME' for each"
                ) from None
            self._users = {}
            return self._users
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise ConfigurationError(
                f"{self.path} is a symbolic link: the users file is read only as "
                "itself (a link can be turned to another file); give the file's own "
                "path"
            ) from None
        with open(fd, encoding="utf-8") as handle:
            return self._read(handle, os.fstat(fd))

    def _read(self, handle: TextIO, info: os.stat_result) -> dict[str, bytes]:
        """The users in ``handle`` (the file, ``info`` its stat), once checked."""
        # Its time and size alone would miss a file copied over with its time
        # kept (rsync -a, cp -p) and a token replaced by one of the same length:
        # that file is another inode, and any write or rename changes the ctime.
        stamp = (info.st_ino, info.st_ctime_ns, info.st_mtime_ns, info.st_size)
        if stamp == self._stamp:
            return self._users
        if not stat.S_ISREG(info.st_mode):
            raise ConfigurationError(
                f"{self.path} is not a regular file: give the users file itself"
            )
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigurationError(
                f"users file {self.path} is readable or writable by others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}): it holds every user's "
                f"credential; run chmod 600 {self.path}"
            )
        foreign = foreign_owner(info)
        if foreign:
            raise ConfigurationError(
                f"users file {self.path} belongs to {foreign}, not to the "
                "scheduler's user or root: its owner can add users to it; chown it"
            )
        users: dict[str, bytes] = {}
        for number, line in enumerate(handle.read().splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 2 or not NAME_PATTERN.fullmatch(fields[0]):
                raise ConfigurationError(
                    f"{self.path}, line {number}: expected 'NAME TOKEN'"
                )
            users[fields[0]] = fields[1].encode()
        self._users, self._stamp = users, stamp
        return users

    def lookup(self, name: str) -> bytes | None:
        """The token of user ``name`` (None: no such user, or the file is bad)."""
        try:
            return self.load().get(name)
        except (ConfigurationError, OSError):
            return self._users.get(name)

    def names(self) -> set[str]:
        """The users' names (those of the last good read if the file is bad now)."""
        try:
            return set(self.load())
        except (ConfigurationError, OSError):
            return set(self._users)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, bytes]]:
        """The users, read afresh under an exclusive lock held until the block's
        end: two ``user add``/``revoke`` at once would otherwise both rewrite the
        file from what they read, and one of them would lose the other's change."""
        self._make_directory()
        lock = self.path.with_name(f".{self.path.name}.lock")
        # Only locked, never written or followed (a symlink planted there by
        # another user leads nowhere).
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._stamp = None  # another process may have changed it just now
            yield dict(self.load())
        finally:
            os.close(fd)  # releases the lock

    def _make_directory(self) -> None:
        """Make the users file's directory if it is missing (mode 0700: the
        file's is the scheduler's), as ``/etc/dispynb`` for ``/etc/dispynb/users``;
        a longer missing path is a typo more likely than a wish: refused, not made
        (it was, all of it, as root even at ``/``)."""
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            if not directory.is_dir():
                raise ConfigurationError(
                    f"{directory} is not a directory: give --users a path in one"
                ) from None
        except FileNotFoundError:
            raise ConfigurationError(
                f"no directory {directory.parent} for the users file {self.path}: "
                f"check the --users path (a typo?), or make it first (mkdir -p -m "
                f"700 {directory})"
            ) from None

    def add(self, name: str) -> str:
        """Add user ``name`` with a new token; return its credential."""
        check_name(name)
        with self._locked() as users:
            if name in users:
                raise ConfigurationError(
                    f"user {name!r} exists: revoke it first to issue a new credential"
                )
            users[name] = secrets.token_urlsafe(32).encode()
            self._save(users)
        return f"dispynb-user:{name}:{users[name].decode()}"

    def revoke(self, name: str) -> None:
        """Remove user ``name``: its credential no longer opens a session."""
        with self._locked() as users:
            if users.pop(name, None) is None:
                raise ConfigurationError(f"no user {name[:80]!r} in {self.path}")
            self._save(users)

    def _save(self, users: dict[str, bytes]) -> None:
        lines = ["# dispynb-scheduler users: NAME TOKEN (keep this file private)"]
        lines += [f"{name} {token.decode()}" for name, token in sorted(users.items())]
        _write_private(self.path, "\n".join(lines) + "\n")
        self._stamp = None


def write_credential(path: str | os.PathLike[str], credential: str) -> None:
    """Write a user's credential to ``path`` (mode 0600)."""
    _write_private(Path(path), credential + "\n")


__all__ = ["NAME_PATTERN", "UsersFile", "check_name", "write_credential"]
