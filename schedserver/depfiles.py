"""`ClientFiles`: the files clients upload (``depends``, ``send_file``), kept on disk
for as long as a computation (or the session that sent them) needs them.

The scheduler sends a computation's files to every node that asks (also nodes that
join later), so it keeps them while the computation lives; it keeps them in its
private spill directory (`SpillStore`: files 0600 with random names, unlinked at
once), never in memory. A file is sent from a read-only memory map of its spill
file (page cache, not the scheduler's heap). Each file is claimed by the
computations whose setup lists it and, if none did yet, by the sessions that
uploaded it; it is released when the last of them ends (the computation closes,
its client becomes a zombie or is revoked, the session ends) or lets it go (a
client releases a job's own file once no job of its needs it: `release_some`).
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import resource

from schedserver.spill import SpillStore

logger = logging.getLogger(__name__)


def files_quota() -> int:
    """Files one user may have kept by default: an eighth of the descriptors the
    scheduler may open (each file kept holds one), so that no user can take the
    descriptors its nodes' and the other users' connections need."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, soft // 8)


#: Bytes of free disk space the files kept never take (less on a small file
#: system: `room_kept`).
ROOM_KEPT = 1 << 30


def room_kept(total: int) -> int:
    """Bytes the files kept leave free on a file system of ``total`` bytes: 1 GiB,
    or a twentieth of a smaller one's size."""
    return min(ROOM_KEPT, total // 20)


class ClientFiles:
    """Uploaded files by digest, on disk; ``max_file_size`` bytes each at most (0:
    no limit), ``max_files`` per user at once (0: no limit), and their bytes within
    what each user may hold in all (``store.user(name)``: --max_user_kept)."""

    def __init__(
        self, store: SpillStore, max_file_size: int, max_files: int = 0
    ) -> None:
        self.store = store
        self.max_file_size = max_file_size
        self.max_files = max_files
        #: digest -> the user whose quota it counts in (who sent it first);
        #: user -> how many files count in its quota.
        self._owner: dict[str, str] = {}
        self._counts: collections.Counter[str] = collections.Counter()
        #: digest -> (descriptor of its unlinked spill file, size).
        #: digest -> its content, mapped read-only from its file (the map's own
        #: descriptor keeps the file, unlinked), and its size. One map per file,
        #: however often it is sent: a map each (and a descriptor: a map holds
        #: one) let a user's requests take the 65,530 maps a process may have,
        #: and its descriptors.
        self._files: dict[str, tuple[memoryview, int]] = {}
        #: digest -> what claims it; holder -> the digests it claims.
        self._claims: dict[str, set[object]] = {}
        self._held: dict[object, set[str]] = {}
        #: Digests claimed by the sessions that uploaded them (no computation lists
        #: them): every session that uploads one claims it.
        self._uploaded: set[str] = set()

    def __contains__(self, digest: str) -> bool:
        return digest in self._files

    def __len__(self) -> int:
        return len(self._files)

    @property
    def size(self) -> int:
        """Bytes of files kept (on disk)."""
        return sum(size for _content, size in self._files.values())

    def too_large(self, size: int, name: str = "a file") -> str:
        """Why a file of ``size`` bytes is refused ("" if it is not)."""
        if self.max_file_size and size > self.max_file_size:
            return (
                f"{name} of {size} bytes is over the scheduler's maximum file size "
                f"of {self.max_file_size} bytes (dispynb-scheduler --max_file_size): "
                "send a smaller file, or have the limit raised"
            )
        return ""

    def claim(self, holder: object, digests: list[str]) -> None:
        """``holder`` needs these files (sent already or still to come)."""
        for digest in digests:
            self._claims.setdefault(digest, set()).add(holder)
            self._held.setdefault(holder, set()).add(digest)

    def release(self, holder: object) -> None:
        """``holder`` ended: drop the files nothing else claims."""
        for digest in self._held.pop(holder, set()):
            holders = self._claims.get(digest)
            if holders is None:
                continue
            holders.discard(holder)
            if not holders:
                del self._claims[digest]
                self._drop(digest)

    def release_some(self, holder: object, digests: list[str]) -> None:
        """``holder`` no longer needs these files (its jobs that did ended): drop
        those that nothing else claims."""
        held = self._held.get(holder)
        if not held:
            return
        for digest in digests:
            if digest not in held:
                continue
            held.discard(digest)
            holders = self._claims.get(digest)
            if holders is not None:
                holders.discard(holder)
                if not holders:
                    del self._claims[digest]
                    self._drop(digest)
        if not held:
            del self._held[holder]

    def put(self, digest: str, data: memoryview, uploader: object, user: str) -> str:
        """Keep ``data`` (checked against its digest by the caller) on disk; claimed
        by ``uploader`` if nothing claims it yet, in ``user``'s quota. Returns why
        it was refused ("")."""
        refused = self.too_large(data.nbytes)
        if refused:
            return refused
        if digest not in self._files and 0 < self.max_files <= self._counts[user]:
            return (
                f"file {digest[:16]}... refused: user {user!r} has {self.max_files} "
                "files kept at the scheduler already, its quota (dispynb-scheduler "
                "--max_files); they go when the computations that list them close, "
                "and a job's own files when no job of its client needs them"
            )
        account = self.store.user(user)
        if digest not in self._files and data.nbytes > account.room():
            return (
                f"file {digest[:16]}... of {data.nbytes} bytes refused: user "
                f"{user!r} holds {account.size} bytes at the scheduler already, "
                "files and kept results together, of the "
                f"{account.quota} it may (dispynb-scheduler --max_user_kept); files "
                "go when the computations that list them close, results as their "
                "client collects them: send less at once, or have the quota raised"
            )
        if not self._claims.get(digest) or digest in self._uploaded:
            self.claim(uploader, [digest])
            self._uploaded.add(digest)
        if digest in self._files:
            return ""
        try:
            fd = self.store.new_file()
        except OSError as exc:
            self.release_some(uploader, [digest])  # its other files stay
            logger.warning("cannot keep file %s...: %s", digest[:16], exc)
            return f"the scheduler cannot keep file {digest[:16]}...: {exc}"
        refused = self._no_room(fd, digest, data.nbytes)
        if refused:
            os.close(fd)
            self.release_some(uploader, [digest])
            return refused
        try:
            view = data.cast("B") if data.ndim != 1 or data.format != "B" else data
            written = 0
            while written < view.nbytes:
                written += os.pwrite(fd, view[written:], written)
            content = (
                memoryview(mmap.mmap(fd, view.nbytes, prot=mmap.PROT_READ))
                if view.nbytes
                else memoryview(b"")
            )
        except OSError as exc:
            self.release_some(uploader, [digest])  # its other files stay
            logger.warning("cannot keep file %s...: %s", digest[:16], exc)
            return f"the scheduler cannot keep file {digest[:16]}...: {exc}"
        finally:
            os.close(fd)  # (the map has its own)
        self._files[digest] = (content, view.nbytes)
        self._owner[digest] = user
        self._counts[user] += 1
        account.size += view.nbytes
        return ""

    def _no_room(self, fd: int, digest: str, size: int) -> str:
        """Why a file of ``size`` bytes is not written to ``fd`` ("" if it is): it
        would leave less than `room_kept` free on the file system, which the
        kept results of every user, and the machine's other programs (it is
        ``/tmp`` by default), need as well."""
        try:
            stats = os.fstatvfs(fd)
        except OSError:
            return ""  # cannot tell: the write says
        free = stats.f_bavail * stats.f_frsize
        keep = room_kept(stats.f_blocks * stats.f_frsize)
        if free - size >= keep:
            return ""
        return (
            f"file {digest[:16]}... of {size} bytes refused: the scheduler keeps "
            f"{keep} bytes free on the file system of {self.store.prefix} "
            f"(--dest_path_prefix), which has {free}; the files kept take "
            f"{self.size} bytes: they go when the computations that list them "
            "close; or have --dest_path_prefix on a larger file system"
        )

    def get(self, digest: str) -> memoryview | None:
        """The file's content, mapped read-only from disk (None: not here)."""
        kept = self._files.get(digest)
        return None if kept is None else kept[0]

    def close(self) -> None:
        """Drop every file (the scheduler stops)."""
        for digest in list(self._files):
            self._drop(digest)
        self._claims.clear()
        self._held.clear()
        self._uploaded.clear()

    def _drop(self, digest: str) -> None:
        self._uploaded.discard(digest)
        # Its map, and the file, go once no connection writes it any more.
        kept = self._files.pop(digest, None)
        owner = self._owner.pop(digest, None)
        if owner is not None:
            if kept is not None:
                self.store.user(owner).size -= kept[1]
            self._counts[owner] -= 1
            if not self._counts[owner]:
                del self._counts[owner]


__all__ = ["ClientFiles"]
