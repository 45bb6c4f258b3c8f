"""`FileStore`: the node's content-addressed store of files sent by clients.

A file is kept once under its SHA-256, whoever sent it and for whichever computation,
and is hard-linked into each computation's directory that needs it, so a file sent
again (the same data file for a new computation) need not travel twice.

Each session that sent or uses a file, and each computation that placed it as an
object (`dispynb.objects`), holds it (`hold`, `release`). The last release of a file
marked `disposable` (an object) unlinks it, so two clusters that put the same object
on one node share one copy safely. Other files nobody holds stay as a cache, so that
a notebook run again does not send its data files again, but only up to
``cache_size`` bytes: the ones idle longest go first (also those a node left behind
when it stopped), so a node that serves for months does not fill its disk with every
file it was ever sent; and when the disk is full, they go before a file is refused.

Files are not synced one by one as they are stored (a flush of the disk each, on the
node's loop for small ones): a power loss may leave a stored file empty or cut short
under its name. So the store notes in ``.boot`` the machine's boot its files were
written in (on the disk before any is stored), and that they all were on the disk
when its node stopped (``synced``). A node that starts after the machine stopped
without that (another boot id, not synced) checks the digest of each file left,
within ``cache_size``, and removes those whose data was lost: sent again, never
given to a job as they are. A node that died alone (the same boot) left its files
whole in the machine's page cache.

A computation's file is a hard link to the stored one, so a job that writes to a file
it was given (opens it to append, say) changes the stored copy. Every stored file is
given a fixed modification time (`STORED_MTIME_NS`) that any write changes, and is
used again only while it has it: one ``stat``, no hashing. A changed file is sent
again (`has` and `put` take it for missing), never placed (`place` refuses it) and
removed from the cache (`release`, and at start), so another computation, or the next
run of the same one, gets the file as its client sent it; the job that changed it
keeps its own changed copy. Computations that hold the same file at the same time
share it (as jobs of one computation share their directory).

Nodes may share a destination directory (its default, ``<tmp>/dispynb``, is every
node's of a user on the machine), but not a store (`claim_store`): the holds are each
node's own, so one node removed files another node's computations held (a disposable
object it released, its cache), and its start removed the other's partial writes.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time

from dispynb.daemon import read_own_file, replace_file
from dispynb.errors import ProtocolError
from dispynb.protocol.files import digest_of, link_inside
from dispynb.protocol.shm import boot_id
from dispynb.wording import counted
from nodeserver.spooldisk import syncfs

_DIGEST = re.compile(r"[0-9a-f]{64}")
_EMPTY_DIGEST = digest_of(b"")

logger = logging.getLogger(__name__)


class CannotStore(ProtocolError):
    """The node cannot write a file (its disk is full, say): no fault of the client,
    which will not send it again."""


class DiskFull(CannotStore):
    """No space (or quota) left for a file: `FileStore.make_room` may free some."""


#: Modification time of every stored file (2000-01-01, whole seconds: any file
#: system keeps it exactly); a write sets it to the time of the write.
STORED_MTIME_NS = 946_684_800 * 1_000_000_000

#: File in the store: "<boot id> running" while its node runs, "<boot id> synced"
#: once it stopped with every file on the disk.
BOOT_MARK = ".boot"

#: Errors of a write that room on the disk may cure.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})


class FileStore:
    """Files by content under ``root``; ``max_file_size`` 0 means no limit."""

    def __init__(
        self, root: str, max_file_size: int = 0, cache_size: int | None = None
    ) -> None:
        self.root = root
        self.max_file_size = max_file_size
        #: Bytes of files nobody holds kept for reuse (None: no limit).
        self.cache_size = cache_size
        os.makedirs(root, mode=0o700, exist_ok=True)
        self._holds: collections.Counter[str] = collections.Counter()
        self._disposable: set[str] = set()
        #: Files nobody holds, by digest, idle longest first, with their sizes.
        self._idle: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._idle_bytes = 0
        self._adopt_leftovers()
        if self._idle and self._machine_stopped():
            self._check_leftovers()
        # On the disk before any file is stored here: a "synced" of an earlier run
        # must not vouch for the files of this one.
        self._mark("running")

    @property
    def cached_bytes(self) -> int:
        """Bytes of the files kept that nobody holds."""
        return self._idle_bytes

    def _adopt_leftovers(self) -> None:
        """Files of an earlier run of the node are idle (used longest ago first);
        partial writes it left, and files its jobs changed, are removed."""
        found = []
        with os.scandir(self.root) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.name.endswith(".part") or (
                        entry.name.startswith(f"{BOOT_MARK}.")
                        and entry.name.endswith(".tmp")
                    ):
                        os.unlink(entry.path)
                    elif _DIGEST.fullmatch(entry.name) and entry.is_file():
                        stat = entry.stat()
                        # Empty but for the empty file's digest: its data never
                        # reached the disk (a power loss after the rename: stored
                        # files are not synced, for speed), so not as sent.
                        empty = stat.st_size == 0 and entry.name != _EMPTY_DIGEST
                        if stat.st_mtime_ns != STORED_MTIME_NS or empty:
                            os.unlink(entry.path)
                            continue
                        found.append((stat.st_atime_ns, entry.name, stat.st_size))
        for _atime, digest, size in sorted(found):
            self._idle[digest] = size
            self._idle_bytes += size
        self._evict()

    def _machine_stopped(self) -> bool:
        """Whether the machine may have stopped since the files left here were
        written, before the disk had them all (see the module docstring)."""
        try:  # never a FIFO a job put there: a node's start hung on it
            mark = read_own_file(os.path.join(self.root, BOOT_MARK), 200)
            boot, _, state = mark.decode().strip().partition(" ")
        except (OSError, UnicodeDecodeError):
            return True  # a store of an older node, or unreadable: unknown
        return state != "synced" and (not boot or boot != boot_id())

    def _check_leftovers(self) -> None:
        """Remove the files left whose data does not match their digest (a power
        loss cut them short): a client sends them again."""
        start = time.monotonic()
        checked = total = 0
        lost = []
        for digest, size in list(self._idle.items()):
            checked += 1
            total += size
            try:
                with open(self.path(digest), "rb") as handle:
                    whole = hashlib.file_digest(handle, "sha256").hexdigest() == digest
            except OSError:
                whole = False
            if not whole:
                lost.append(digest)
                del self._idle[digest]
                self._idle_bytes -= size
                with contextlib.suppress(OSError):
                    os.unlink(self.path(digest))
        logger.info(
            "the machine stopped since this node's files were stored: checked %s "
            "(%s) in %.2f s; removed %s that lost data (sent again)",
            counted(checked, "file"),
            counted(total, "byte"),
            time.monotonic() - start,
            counted(len(lost), "file"),
        )

    def _mark(self, state: str) -> None:
        try:
            replace_file(
                os.path.join(self.root, BOOT_MARK), f"{boot_id()} {state}\n", 0o600
            )
        except OSError as exc:  # no mark: the next start checks the files
            logger.warning("cannot write %s in %s: %s", BOOT_MARK, self.root, exc)

    def close(self) -> None:
        """The node stops: its files are put on the disk, so that the next start
        after the machine's stop need not check them (blocks: call in a thread)."""
        try:
            syncfs(self.root)
        except OSError as exc:
            logger.warning("cannot flush stored files in %s: %s", self.root, exc)
            return
        self._mark("synced")

    def path(self, digest: str) -> str:
        """Where the file with this digest is kept."""
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise ProtocolError(f"bad file digest {digest!r}")
        return os.path.join(self.root, digest)

    def has(self, digest: str) -> bool:
        """Whether the store holds this file as it was sent (one changed since, by
        a job writing to it, is not)."""
        return self._state(self.path(digest)) == "intact"

    @staticmethod
    def _state(path: str) -> str:
        """``"intact"``, ``"changed"`` (written to since it was stored) or
        ``"missing"``."""
        try:
            mtime = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return "missing"
        return "intact" if mtime == STORED_MTIME_NS else "changed"

    def check_size(self, size: int, name: str = "a file") -> None:
        """Raise `ProtocolError` if ``size`` is over the node's limit."""
        if self.max_file_size and size > self.max_file_size:
            raise ProtocolError(
                f"{name} of {size} bytes is over this node's maximum file size of "
                f"{self.max_file_size} bytes (dispynb-node --max-file-size)"
            )

    def put(self, digest: str, data: memoryview | bytes) -> None:
        """Store ``data``, checking that it is what ``digest`` says (safe to call
        from a thread)."""
        self.check_size(len(data))
        path = self.path(digest)
        if self._state(path) == "intact":
            return  # a changed one is replaced (its links keep their own copy)
        if digest_of(data) != digest:
            raise ProtocolError("a file's content does not match its digest")
        # Unique per thread too: sessions store large files in threads at once.
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.part"
        try:
            # Made again if removed (a /tmp cleaner, an operator): the node serves on.
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(data)
            # Marked as stored (the access time orders the cache of a next run).
            os.utime(tmp, ns=(time.time_ns(), STORED_MTIME_NS))
            os.replace(tmp, path)
        except OSError as exc:  # a full disk, a quota: this file is refused, saying so
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            kind = DiskFull if exc.errno in _NO_ROOM else CannotStore
            why = exc.strerror or str(exc)
            if exc.errno == errno.EFBIG:  # not the disk: the process's own limit
                why += (
                    " (the node's file size limit, ulimit -f: have it raised, or "
                    "send smaller files)"
                )
            raise kind(
                f"the node cannot store a file of {len(data)} bytes in {self.root}: "
                f"{why}"
            ) from None

    def make_room(self, size: int) -> bool:
        """The disk is full: unlink cached files nobody holds, idle longest first,
        until ``size`` bytes were freed (or none is left). Returns whether any was.

        Called on the node's loop only (as `hold` and `release`), never while a
        thread stores a file: a file being stored is held, never idle."""
        freed = removed = 0
        while self._idle and freed < size:
            digest, idle_size = self._idle.popitem(last=False)
            self._idle_bytes -= idle_size
            with contextlib.suppress(OSError):
                os.unlink(self.path(digest))
                freed += idle_size
                removed += 1
        if removed:
            logger.info(
                "disk full: removed %s nobody uses (%s) to store one of %s",
                counted(removed, "cached file"),
                counted(freed, "byte"),
                counted(size, "byte"),
            )
        return freed > 0

    def place(
        self, digest: str, directory: str, relative: str, executable: bool = False
    ) -> str:
        """Link the stored file to ``directory/relative``; return the path. An
        ``executable`` one (a program the client sent) is made executable, as
        dispy kept a sent file's mode: the stored copy, which the link shares."""
        path = self.path(digest)
        state = self._state(path)
        if state == "missing":
            raise ProtocolError(f"file {relative!r} was not sent to this node")
        if state == "changed":
            raise ProtocolError(
                f"file {relative!r} was changed on this node since it was sent: a job "
                "wrote to it (computations using one file share it on a node: a job "
                "should write to a copy of it)"
            )
        if executable:  # read bits become execute bits (0o644: 0o755)
            mode = stat.S_IMODE(os.stat(path).st_mode)
            os.chmod(path, mode | (mode & 0o444) >> 2)
        return link_inside(directory, relative, path)

    def hold(self, digest: str) -> None:
        """Count one more user of the file (a session or a computation)."""
        self._holds[digest] += 1
        size = self._idle.pop(digest, None)
        if size is not None:
            self._idle_bytes -= size

    def disposable(self, digest: str) -> None:
        """Mark the file to be removed once its last holder releases it."""
        self._disposable.add(digest)

    def release(self, digest: str) -> None:
        """Count one user fewer. A file nobody holds any more is unlinked if it is
        disposable, else kept in the cache (`cache_size`)."""
        if digest not in self._holds:
            return  # not held (a release too many): nothing changes
        self._holds[digest] -= 1
        if self._holds[digest] > 0:
            return
        del self._holds[digest]
        if digest in self._disposable:
            self._disposable.discard(digest)
            with contextlib.suppress(OSError):
                os.unlink(self.path(digest))
            return
        try:
            info = os.stat(self.path(digest))
        except OSError:
            return  # gone already (its store was cleaned): nothing to keep
        if info.st_mtime_ns != STORED_MTIME_NS:
            # A job wrote to it: kept, the next user would get the changed file.
            logger.info("removed file %s: a job changed it", digest[:12])
            with contextlib.suppress(OSError):
                os.unlink(self.path(digest))
            return
        size = info.st_size
        self._idle[digest] = size
        self._idle_bytes += size
        self._evict()

    def _evict(self) -> None:
        """Unlink the files idle longest until the idle ones fit `cache_size`."""
        if self.cache_size is None:
            return
        while self._idle and self._idle_bytes > self.cache_size:
            digest, size = self._idle.popitem(last=False)
            self._idle_bytes -= size
            with contextlib.suppress(OSError):
                os.unlink(self.path(digest))


class StoreClaim:
    """The file store a node uses in its destination directory (`claim_store`):
    ``root``, its own (``private``) or the shared one, held by the ``flock`` of
    ``fd`` for the node's life."""

    def __init__(self, root: str, private: bool, fd: int) -> None:
        self.root = root
        self.private = private
        self.fd: int | None = fd

    def release(self) -> None:
        """The node stops: a store of its own goes (the shared one stays, a cache
        for the next node)."""
        if self.fd is None:
            return
        if self.private:
            shutil.rmtree(self.root, ignore_errors=True)
        os.close(self.fd)
        self.fd = None


def claim_store(dest_path: str) -> StoreClaim:
    """The file store of a node in ``dest_path``: the shared ``.store`` if no other
    node holds it, else one of its own beside it (``.store-*``, removed when it
    stops, or by the next node to start once it is gone)."""
    shared = os.path.join(dest_path, ".store")
    os.makedirs(shared, mode=0o700, exist_ok=True)
    _remove_unlocked_stores(dest_path)
    fd = lock_dir(shared)
    if fd is not None:
        return StoreClaim(shared, False, fd)
    for _ in range(8):
        # Another node's start may remove it before it is locked: then another.
        root = tempfile.mkdtemp(prefix=".store-", dir=dest_path)
        with contextlib.suppress(FileNotFoundError):
            fd = lock_dir(root)
            if fd is not None:
                if os.path.samestat(os.fstat(fd), os.stat(root)):
                    logger.info(
                        "another node uses the file store %s: this node keeps its "
                        "own in %s (removed when it stops)",
                        shared,
                        root,
                    )
                    return StoreClaim(root, True, fd)
                os.close(fd)
    raise OSError(f"cannot make a file store in {dest_path}")


def lock_dir(directory: str) -> int | None:
    """A descriptor of ``directory`` holding its exclusive ``flock``; None if
    another process holds it."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(directory, flags)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _remove_unlocked_stores(directory: str) -> None:
    """Remove the stores of their own (``.store-*``) that no live node holds."""
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.startswith(".store-") or not entry.is_dir(
                follow_symlinks=False
            ):
                continue
            with contextlib.suppress(OSError):
                fd = lock_dir(entry.path)
                if fd is not None:
                    try:
                        shutil.rmtree(entry.path, ignore_errors=True)
                    finally:
                        os.close(fd)
