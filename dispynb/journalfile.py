"""That SQLite uses the very journal file `dispynb.journal` checked, and no file
another user planted beside it (`Beside`).

The journal's file is checked (ours, a regular file, not a symlink) through a
descriptor, then SQLite opens it again by its path: in a directory others can write
to, a symlink to a file of theirs put there in between (and taken away at once) was
followed, and their file got the jobs' arguments and results, and what
``recover_jobs`` unpickles. SQLite cannot be given a descriptor (nor a
``/proc/self/fd`` path: it resolves it to a name, and names its ``-wal`` and ``-shm``
after it), and the path's inode compared after the fact misses a swap there and
back. So `Checked.connect` looks at the descriptors of the process once SQLite
opened the file: one of them must be of the file checked.

That holds only if no other descriptor of the process is of that file. Hence:

- the check's own descriptor is ``O_PATH``, excluded from the look; closing it keeps
  the fcntl locks the process holds on the file (closing any other descriptor of a
  file drops them all, SQLite's included: the lock a WAL connection keeps while
  open);
- the journals of the process on one file share one SQLite connection (`Shared`),
  so no second one of ours is open on it as SQLite opens the file; the last journal
  to let go closes it;
- files are checked and opened one at a time (a module lock);
- a forked child shares none (SQLite's connections may not cross a fork).

Another part of the program opening the journal file as SQLite opens it could still
hide a swap; nothing of dispynb does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from typing import Any

from dispynb.errors import ConfigurationError
from dispynb.secret import foreign_owner, has_access_acl

#: A descriptor that names a file without opening it for I/O (Linux): closing it
#: leaves the process's fcntl locks on the file alone.
_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)

#: (st_dev, st_ino) -> the connection the journals of the process share on the file
_shared: dict[tuple[int, int], Shared] = {}
_shared_lock = threading.RLock()  # release() may come within checked()


def _forget_after_fork() -> None:
    """A forked child opens connections of its own (SQLite's may not cross a
    fork), under a lock no thread of the parent may have held as it forked."""
    global _shared_lock
    _shared.clear()
    _shared_lock = threading.RLock()


os.register_at_fork(after_in_child=_forget_after_fork)


class Shared:
    """One SQLite connection to a journal file, shared by the process's journals on
    it (``lock`` serializes their use of it)."""

    def __init__(self, key: tuple[int, int], db: sqlite3.Connection, name: str) -> None:
        self.key = key
        self.db = db
        #: The database file's path, symlinks resolved (`open_journal_names`).
        self.name = name
        self.lock = threading.Lock()
        self.users = 1


def release(shared: Shared) -> None:
    """A journal using ``shared`` closed: the last one closes the connection.
    Call once per `Checked.connect`."""
    with _shared_lock:
        shared.users -= 1
        if shared.users:
            return
        if _shared.get(shared.key) is shared:
            del _shared[shared.key]
    with shared.lock:
        shared.db.close()


def open_journal_names() -> set[str]:
    """The paths (symlinks resolved) of the journals this process has open, and of
    the files SQLite keeps beside each (`COMPANIONS`): what nothing from a node may
    replace (`dispynb.backends.jobfiles`)."""
    with _shared_lock:
        names = [shared.name for shared in _shared.values()]
    return {name + suffix for name in names for suffix in ("", *COMPANIONS)}


class Checked:
    """The file at ``path`` as `checked` found it: ``info`` (its stat), through
    ``fd`` (an ``O_PATH`` descriptor, closed when the check ends)."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.info = os.fstat(fd)

    def chmod(self, mode: int) -> None:
        """Change the mode of the file checked (not of what its path names now)."""
        _chmod(self.fd, mode)

    def connect(self, target: str, **options: Any) -> Shared:
        """The connection of the process on the file checked, or a new one SQLite
        opens from ``target`` (the path, or a URI with ``uri=True`` in
        ``options``); `ConfigurationError` if SQLite opened another file."""
        key = _identity(self.info)
        shared = _shared.get(key)
        if shared is not None:
            shared.users += 1
            return shared
        db = sqlite3.connect(target, check_same_thread=False, **options)
        try:
            if not self._opened_by_sqlite(key):
                raise ConfigurationError(
                    f"recover_file {self.path!r} was replaced (by a symlink?) as it "
                    "was opened: someone who can write to its directory may be at "
                    "it; give a recover_file in a directory of your own"
                )
        except BaseException:
            db.close()
            raise
        shared = _shared[key] = Shared(key, db, os.path.realpath(self.path))
        return shared

    def _opened_by_sqlite(self, key: tuple[int, int]) -> bool:
        """Whether a descriptor of the process, not ours, is of the file checked
        (SQLite opens the database file as it connects)."""
        if not os.path.isdir("/proc/self/fd"):  # not Linux: after the fact
            return _identity(os.stat(self.path)) == key
        for name in os.listdir("/proc/self/fd"):
            if int(name) == self.fd:
                continue
            with contextlib.suppress(OSError):  # closed since (listdir's own, say)
                if _identity(os.stat(f"/proc/self/fd/{name}")) == key:
                    return True
        return False


@contextlib.contextmanager
def checked(path: str, *, create: bool) -> Iterator[Checked]:
    """The regular file at ``path`` to check, then `Checked.connect` to.

    ``create``: made 0600 if absent, and a symlink is refused (`OSError`, ELOOP);
    otherwise a symlink is followed (what it names is checked) and the file must
    exist. Anything but a regular file raises `OSError`. Journals of the process are
    checked and opened one at a time.
    """
    with _shared_lock:
        if create:
            new = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with contextlib.suppress(FileExistsError):
                # a new file: closing drops no lock of the process
                os.close(os.open(path, new, 0o600))
        flags = _O_PATH | os.O_CLOEXEC | (os.O_NOFOLLOW if create else 0)
        fd = os.open(path, flags)
        try:
            file = Checked(path, fd)
            mode = file.info.st_mode
            if not stat.S_ISREG(mode):
                code = (
                    errno.ELOOP
                    if stat.S_ISLNK(mode)
                    else errno.EISDIR
                    if stat.S_ISDIR(mode)
                    else errno.EINVAL
                )
                raise OSError(code, f"{os.strerror(code)} (not a regular file)", path)
            yield file
        finally:
            os.close(fd)


#: The files SQLite keeps beside a database, named after it.
COMPANIONS = ("-wal", "-shm", "-journal")


def refuse_planted(db_path: str, *, tighten: bool) -> None:
    """Raise `ConfigurationError` if a file SQLite uses beside the database
    ``db_path`` (`COMPANIONS`) is another user's or writable by others
    (`others_can_write`), a symlink or not a regular file.

    Put there first (where others can write: ``/tmp``, a shared directory), SQLite
    used it with the journal: its owner read the jobs' arguments and results, and
    a ``-journal`` of theirs was even rolled back into the journal as SQLite opened
    it (what ``recover_jobs`` unpickles). SQLite refuses symlinks (O_NOFOLLOW) but
    an ``os.chmod`` by name followed them. Call before SQLite opens the database
    and again after its first statement: one planted in between is then seen (and
    in a sticky directory, one of ours cannot be replaced); a ``-journal`` planted
    in between is rolled back before. ``tighten``: ours are made 0600.
    """
    for suffix in COMPANIONS:
        name = db_path + suffix
        try:
            fd = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno != errno.ELOOP:  # no O_PATH: a symlink fails to open
                raise
            what = "a symlink"
        else:
            try:
                info = os.fstat(fd)
                what = (
                    "a symlink"
                    if stat.S_ISLNK(info.st_mode)
                    else "not a regular file"
                    if not stat.S_ISREG(info.st_mode)
                    else f"of {owner}"
                    if (owner := foreign_owner(info))
                    else f"writable by {writers}"
                    if (writers := others_can_write(info, fd))
                    else ""
                )
                if not what and tighten and info.st_mode & 0o077:
                    _chmod(fd, 0o600)  # an older version's
            finally:
                os.close(fd)
        if what:
            raise ConfigurationError(
                f"recover_file {db_path!r} has {name!r} beside it, {what}, which "
                "SQLite would use with it: someone who can write to its directory "
                "may have put it there; remove it, or give a recover_file in a "
                "directory of your own"
            )


class Beside:
    """The files SQLite keeps beside a journal's database (`COMPANIONS`), checked
    (`refuse_planted`) before SQLite opens it and after its first statement
    (`opened`), so that none is planted in between unseen.

    A ``-journal`` planted in between would be rolled back into the database
    before the second check: so beside a database with pages, an empty one of
    ours is put first (SQLite ignores an empty one, and in a sticky directory
    such as ``/tmp`` nobody else can replace it), and removed once SQLite opened
    the database in WAL mode (it then never looks for one). `close` removes it
    whatever happened.
    """

    def __init__(self, db_path: str, info: os.stat_result, *, tighten: bool) -> None:
        self.tighten = tighten
        self._guard: tuple[str, tuple[int, int]] | None = None
        if info.st_size:
            name = db_path + "-journal"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(name, flags, 0o600)
            except OSError:  # there is one (checked below), or no room to make it
                pass
            else:  # SQLite never locks a -journal: closing this drops no lock
                try:
                    self._guard = (name, _identity(os.fstat(fd)))
                finally:
                    os.close(fd)
        refuse_planted(db_path, tighten=tighten)

    def opened(self, db_file: str) -> None:
        """SQLite ran its first statement on ``db_file`` (its name for the
        database): check again, then remove the guard."""
        try:
            refuse_planted(db_file, tighten=self.tighten)
        finally:
            self.close()

    def close(self) -> None:
        """Remove the empty ``-journal`` put beside the database, if still there."""
        if self._guard is None:
            return
        name, identity = self._guard
        self._guard = None
        with contextlib.suppress(OSError):
            info = os.lstat(name)
            if _identity(info) == identity and info.st_size == 0:
                os.unlink(name)


def others_can_write(info: os.stat_result, fd: int) -> str:
    """Who besides its owner can write to a file (``info``: its stat, ``fd``: a
    descriptor of it, as `checked` opens), said for an error; "" if nobody:
    neither everyone (``o+w``) nor a group of other users (``g+w``; a group of the
    user's own, of no other member, is not others) nor users or groups its access
    ACL names (its group bits are then their mask: ``g+w`` if any may write).

    Mode 0600 set on a journal once others could write to it is too late: what
    they wrote stays, and a descriptor they opened then still writes."""
    mode = stat.S_IMODE(info.st_mode)
    if os.name != "posix" or not mode & 0o022:
        return ""
    if mode & 0o002:
        return f"every user (mode {mode:04o})"
    if has_access_acl(fd):
        return f"the users its ACL names (mode {mode:04o} and an access ACL)"
    group = _group_of_others(info.st_gid)
    return f"the users of group {group} (mode {mode:04o})" if group else ""


def _group_of_others(gid: int) -> str:
    """Group ``gid``'s name if users other than this one are in it; "" if not."""
    try:
        import grp
        import pwd
    except ImportError:
        return ""
    me = os.geteuid()
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return f"{gid} (unknown, so maybe anyone)"
    try:
        name = pwd.getpwuid(me).pw_name
    except KeyError:
        name = ""
    if any(member != name for member in group.gr_mem) or any(
        user.pw_gid == gid and user.pw_uid != me for user in pwd.getpwall()
    ):
        return repr(group.gr_name)
    return ""


def refuse_writable(path: str, info: os.stat_result, fd: int) -> None:
    """Raise `ConfigurationError` if others can write to the journal ``path``
    (``info``, ``fd``: as `others_can_write` takes them): they could have changed
    what ``recover_jobs`` unpickles."""
    writers = others_can_write(info, fd)
    if writers:
        raise ConfigurationError(
            f"recover_file {path!r} can be written by {writers}: they could "
            "have changed what recover_jobs unpickles (code it runs); remove it, or "
            "if nobody else ever could write to it, chmod go-w it"
        )


def _chmod(fd: int, mode: int) -> None:
    """Change the mode of the file of ``fd`` (an ``O_PATH`` descriptor)."""
    if _O_PATH == os.O_RDONLY:  # no O_PATH: fd is a file's descriptor
        os.fchmod(fd, mode)
    else:
        os.chmod(f"/proc/self/fd/{fd}", mode)


def _identity(info: os.stat_result) -> tuple[int, int]:
    return (info.st_dev, info.st_ino)
