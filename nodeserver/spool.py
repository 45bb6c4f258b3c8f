"""`ResultSpool`: kept results on disk, surviving memory pressure and node restarts.

A recoverable computation's results (see `nodeserver.keeper`) are written to files under
``<dest_path>/.kept/<digest of the recovery id>/``: one file per result, mode 0600 in
0700 directories, written to a temporary name and renamed, so a crash leaves either a
whole result or none (and a partly written temporary file, which the next node
taking the spool removes). The recovery id itself is never written: a directory is found
by hashing the id a client presents, and every file ends with a check under a key
of the id, without which it is not offered (`nodeserver.spoolcheck`: a job could
write a result there for another client to unpickle). A ``meta`` file says how long
the results are kept, and when they expire once the computation has ended; one a
power loss tore costs no result: they are kept for the default time. Neither
results nor ``meta`` are synced one by one on the node's loop (a disk's flush each:
about 50 times the cost of writing a small one, and on a slow disk a loop stalled
for seconds, its pulses and every client with it) but flushed together within
`SYNC_DELAY` of being written, in a thread.

The disk space of all spooled results is bounded (``--kept-results-size``): a result
that does not fit is not kept (the connected client still gets it) and a warning says
which option to raise. Each file counts as the whole blocks it takes on disk, not its
length: a tiny result (about 150 bytes) fills a 4 KiB block.

A result's file is made and read by `nodeserver.spoolfile`, written and flushed by
`nodeserver.spooldisk`, and checked by `nodeserver.spoolcheck`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import mmap
import os
import shutil
import stat
import time
from collections.abc import Iterator
from typing import Any

from dispynb.daemon import open_own_file, read_own_file
from dispynb.errors import KeptUnavailable as KeptUnavailable
from dispynb.wording import counted
from nodeserver.spoolcheck import (
    CHECK_SIZE,
    CopyRefused,
    check_key,
    checks,
    file_check,
    has_signed_shape,
    is_signed_name,
    meta_fields,
    private_copy,
    signed_name,
)
from nodeserver.spooldisk import (
    SHORT,
    block_size,
    is_partial,
    syncfs,
    why_not_written,
    write_file,
)
from nodeserver.spoolfile import HEAD_SIZE, encode, parse_header, result_name

logger = logging.getLogger(__name__)

#: Seconds results are kept when ``meta`` does not say (the client's default).
DEFAULT_KEEP = 3600.0
#: Seconds within which a spooled result is flushed to the disk (with the others
#: written meanwhile: a flush of each costs ~50 times its write).
SYNC_DELAY = 1.0
#: Most bytes of a spool's ``meta`` (it holds a name and two times).
_META_LIMIT = 64 * 1024


@dataclasses.dataclass(eq=False)
class SpoolDir:
    """The spooled results of one kept computation."""

    path: str
    name: str
    keep: float = DEFAULT_KEEP
    #: Wall-clock time the results expire; None while the computation runs.
    expires: float | None = None
    files: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    full_warned: bool = False
    dropped: int = 0
    #: Results that failed to be written since the last that was (`write`).
    failed: int = 0
    #: Why the first of them failed, and what gives room for more.
    failure: str = ""
    remedy: str = ""
    #: The key of its files' checks (`nodeserver.spoolcheck`); None until its
    #: computation's recovery id is known (a spool an earlier process left).
    key: bytes | None = dataclasses.field(default=None, repr=False)
    #: Its node process died while its computation ran (killed: no expiry was
    #: written): the jobs it held whose ends are not here ended with it.
    cut_short: bool = False

    @property
    def size(self) -> int:
        """Bytes of disk the results spooled here take."""
        return sum(size for _, size in self.files)


class ResultSpool:
    """Kept results in files under ``root``, at most ``max_bytes`` in all.

    Parameters
    ----------
    root:
        The spool directory (inside the node's ``dest_path``); made mode 0700.
    max_bytes:
        Most disk space spooled results may take; 0 keeps none on disk.
    """

    def __init__(self, root: str, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.used = 0
        self._seq = 0
        self._block = block_size(root)
        self._sync_due = False  # a flush of what was written is scheduled

    def _on_disk(self, length: int) -> int:
        """Disk space a file of ``length`` bytes takes: whole blocks."""
        return -(-length // self._block) * self._block

    @staticmethod
    def key(recovery_id: str) -> str:
        """The directory name of a recovery id (the id itself is never stored)."""
        return hashlib.sha256(recovery_id.encode()).hexdigest()[:32]

    def create(self, recovery_id: str, name: str) -> SpoolDir:
        """A new, empty spool directory for a computation (an old one is replaced)."""
        path = os.path.join(self.root, self.key(recovery_id))
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        if os.path.isdir(path):
            self.remove(self._read_dir(path) or SpoolDir(path, name))
        os.mkdir(path, mode=0o700)
        spool = SpoolDir(path, name, key=check_key(recovery_id))
        # Raises: the results stay in memory.
        write_file(*self._meta(spool))
        self._schedule_sync()  # the directory and its meta, with the results
        return spool

    def write_meta(self, spool: SpoolDir) -> bool:
        """Record how long ``spool`` is kept (and when it expires, once known).

        False (logged) if it cannot (a full disk): this run of the node keeps the
        results as long anyway, and its start, stop and clients go on.
        """
        try:
            write_file(*self._meta(spool))
        except OSError as exc:
            logger.warning(
                "cannot record how long results of %s are kept: %s", spool.name, exc
            )
            return False
        self._schedule_sync()
        return True

    @staticmethod
    def _meta(spool: SpoolDir) -> tuple[str, list[bytes]]:
        meta = {
            "name": spool.name,
            "keep": spool.keep,
            "expires": spool.expires,
            "cut_short": spool.cut_short,
        }
        return os.path.join(spool.path, "meta"), [json.dumps(meta).encode()]

    def write(
        self,
        spool: SpoolDir,
        entry: list[Any],
        buffers: list[memoryview],
        kinds: str = "",
    ) -> bool:
        """Spool one result (``kinds``: its buffers' `ResultChunk.kind` letters, if
        known); False if it does not fit (a warning says so) or failed."""
        parts, length = encode(entry, buffers, kinds)
        size = self._on_disk(length + CHECK_SIZE)
        if self.used + size > self.max_bytes:
            spool.dropped += 1
            if not spool.full_warned:
                spool.full_warned = True
                logger.warning(
                    "kept-result spool full (%.1f of %.1f MiB): results of computation "
                    "%s are no longer kept for recovery (its connected client still "
                    "gets them); raise --kept-results-size",
                    self.used / 2**20,
                    self.max_bytes / 2**20,
                    spool.name,
                )
            return False
        assert spool.key is not None, "a spool written to is its computation's"
        self._seq += 1
        name = signed_name(spool.key, result_name(self._seq, entry))
        path = os.path.join(spool.path, name)
        try:
            parts.append(file_check(spool.key, name, parts))
            write_file(path, parts)
        except OSError as exc:
            spool.failed += 1
            if spool.failed == 1:  # then counted: a full disk fails every result
                spool.failure, spool.remedy = why_not_written(exc)
                logger.warning(
                    "cannot spool a kept result of computation %s to %s: %s (results "
                    "of it that fail so are counted, not logged each)",
                    spool.name,
                    spool.path,
                    spool.failure,
                )
            else:
                logger.debug(
                    "cannot spool a kept result of computation %s (counted): %s",
                    spool.name,
                    exc,
                )
            return False
        self.report_failures(spool, "spooling works again")
        spool.files.append((path, size))
        self.used += size
        self._schedule_sync()
        return True

    def _schedule_sync(self) -> None:
        """Have the results written now on the disk within `SYNC_DELAY` s: one flush
        of the file system for all of them, in a thread (the node's loop does not
        wait for the disk). Without a running loop, `sync` is the caller's."""
        if self._sync_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._sync_due = True
        loop.call_later(SYNC_DELAY, self._start_sync, loop)

    def _start_sync(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sync_due = False
        try:
            loop.run_in_executor(None, self.sync)
        except RuntimeError:  # the node is closing: its executor is gone
            self.sync()

    def sync(self) -> None:
        """Put the spooled results on the disk (logged if it cannot)."""
        try:
            syncfs(self.root)
        except OSError as exc:
            logger.warning("cannot flush kept results in %s: %s", self.root, exc)

    def read(
        self, spool: SpoolDir, path: str
    ) -> tuple[list[Any], list[memoryview]] | None:
        """A spooled result as ``(entry, buffers)``; None (logged) if unreadable."""
        result = self.open(spool, path)
        return None if result is None else (result[0], result[1])

    def open(
        self, spool: SpoolDir, path: str
    ) -> tuple[list[Any], list[memoryview], str] | None:
        """A spooled result of ``spool`` as ``(entry, buffers, kinds)``, its buffers
        views of a copy only the node reaches (`spoolcheck.private_copy`: over
        1 MiB, a file with no name mapped read-only, page cache rather than this
        process's heap; never a map of the file itself, which its jobs can cut
        short: SIGBUS); None (logged) if unreadable, or cut short as it is read,
        or if it fails its check (`nodeserver.spoolcheck`). Raises
        `KeptUnavailable` if the node lacks the memory, descriptors or disk space
        to read it now (the result is whole: reported lost, it was deleted with
        the others)."""
        name = os.path.basename(path)
        try:
            if spool.key is None or not is_signed_name(spool.key, name):
                raise _Unchecked("its name is not one this node gave a result of it")
            fd = open_own_file(path)  # never a FIFO a job put there: it hung
            try:
                size = os.fstat(fd).st_size
                if size < HEAD_SIZE + CHECK_SIZE:
                    raise ValueError("not a spooled result")
                # Checked and sent as copied: a job may change the file meanwhile.
                copy = private_copy(fd, size, os.path.dirname(path))
            finally:
                os.close(fd)
            try:
                with memoryview(copy) as whole:
                    if not checks(spool.key, name, whole):
                        raise _Unchecked("it changed since this node wrote it")
                entry, sizes, kinds, offset = parse_header(copy, size - CHECK_SIZE)
            except BaseException:
                if isinstance(copy, mmap.mmap):
                    copy.close()  # nothing refers to it: its descriptor goes now
                raise
        except _Unchecked as exc:
            logger.warning(
                "spooled result %s of computation %s failed the node's check, not "
                "sent: %s (torn as the machine stopped, or written by something "
                "else of the node's user: its jobs can write there)",
                path,
                spool.name,
                str(exc),  # (not the exception: its frames hold the caller's maps)
            )
            return None
        except CopyRefused as exc:
            # The fix first (a client shows a node's error cut short), and not a
            # --dest-path elsewhere: a node given another one no longer has the
            # results kept in this one.
            raise KeptUnavailable(
                "the node cannot send the results it kept now; they stay kept: "
                "restart the node with TMPDIR on a local file system (ext4, xfs, "
                "btrfs, tmpfs) and the same --dest-path, then call recover_jobs "
                f"again ({exc.strerror})"
            ) from None
        except OSError as exc:
            if exc.errno in SHORT:  # the file is whole: not to be taken for lost
                raise KeptUnavailable(
                    f"the node cannot read the results it kept now ({exc.strerror}: "
                    "short of memory, disk space or file descriptors); they stay "
                    "kept: call recover_jobs again later"
                ) from None
            logger.warning("spooled result %s cannot be read: %s", path, str(exc))
            return None
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("spooled result %s cannot be read: %s", path, str(exc))
            return None
        data = memoryview(copy)  # a map is closed with the last view of it
        buffers = []
        for part in sizes:
            buffers.append(data[offset : offset + part])
            offset += part
        return entry, buffers, kinds

    def check_names(self, spool: SpoolDir, recovery_id: str) -> None:
        """``spool``, left by an earlier process, is claimed with ``recovery_id``:
        its files whose names the node did not sign under it are dropped (logged),
        never offered: a job wrote them (or a node older than these checks)."""
        spool.key = check_key(recovery_id)
        foreign = [
            path
            for path, _size in spool.files
            if not is_signed_name(spool.key, os.path.basename(path))
        ]
        if foreign:
            logger.warning(
                "%s in the kept results of computation %s %s not written by this "
                "node for it, and not offered: put there by something of the "
                "node's user (its jobs can write there), or by a dispynb-node "
                "older than the checks of kept results (removed)",
                counted(len(foreign), "file"),
                spool.name,
                "is" if len(foreign) == 1 else "are",
            )
            self.discard(spool, foreign)

    def discard(self, spool: SpoolDir, paths: list[str]) -> None:
        """Delete some of ``spool``'s results (their client journaled them)."""
        gone = set(paths)
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        kept = []
        for path, size in spool.files:
            if path in gone:
                self.used -= size
            else:
                kept.append((path, size))
        spool.files = kept

    @staticmethod
    def report_failures(spool: SpoolDir, now: str) -> None:
        """Log how many results of ``spool`` failed to be written since the last
        that was, if any (``now``: what ends the count), and start again."""
        if spool.failed:
            logger.info(
                "%s of computation %s could not be spooled (the first: %s); %s",
                counted(spool.failed, "result"),
                spool.name,
                spool.failure,
                now,
            )
            spool.failed = 0

    def remove(self, spool: SpoolDir) -> None:
        """Delete a spool directory and its results (its computation is collected,
        closed or expired)."""
        # The results the disk refused were held in memory (`Kept._keep`),
        # not lost: they go with their computation, as the spooled ones do.
        self.report_failures(
            spool,
            "they were held in memory instead, as far as --kept-results-size allowed, "
            "and are let go now with the computation",
        )
        self.used -= spool.size
        spool.files.clear()
        shutil.rmtree(spool.path, ignore_errors=True)

    def load(self) -> dict[str, SpoolDir]:
        """Spool directories left by an earlier node process, by key (expired ones
        are deleted)."""
        found: dict[str, SpoolDir] = {}
        now = time.time()
        for key, spool in self._dirs():
            self.used += spool.size
            if spool.expires is not None and spool.expires <= now:
                self.remove(spool)
                continue
            found[key] = spool
        return found

    def remove_expired(self) -> tuple[int, int]:
        """In a spool no node holds: remove the computations whose results expired,
        and those whose node died while their jobs ran (no expiry recorded) once
        their ``keep`` has passed since their last write; return how many and
        their bytes. A node that never returns (a fixed ``--port`` retired) left
        them, and only a node of its port would have loaded its spool."""
        removed = freed = 0
        now = time.time()
        for _key, spool in self._dirs():
            expires = spool.expires
            if expires is None:
                try:
                    expires = os.stat(spool.path).st_mtime + spool.keep
                except OSError:
                    continue
            if expires <= now:
                removed += 1
                freed += spool.size
                shutil.rmtree(spool.path, ignore_errors=True)
        return removed, freed

    def _dirs(self) -> Iterator[tuple[str, SpoolDir]]:
        """The spool directories here, by key (see `_read_dir`)."""
        if not os.path.isdir(self.root):
            return
        for key in sorted(os.listdir(self.root)):
            spool = self._read_dir(os.path.join(self.root, key))
            if spool is not None:
                yield key, spool

    def _read_dir(self, path: str) -> SpoolDir | None:
        """The spool in ``path``; None if there is none (an empty or foreign one is
        removed, an unreadable one left as it is: both logged).

        A ``meta`` file torn by a crash (a power loss before the disk had it) does not
        cost the results beside it: they are kept for the default time, under the
        directory's name."""
        if os.path.islink(path) or not os.path.isdir(path):
            return None  # not a spool's (left as it is)
        try:
            names = sorted(os.listdir(path))
            files = []
            foreign = []
            for name in names:
                if is_partial(name):
                    # Its node was killed as it wrote it (`write_file`): never
                    # to be completed, and counted nowhere, so not in
                    # --kept-results-size either. Only the node holding this
                    # spool writes here, and it is this one (or none runs).
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(path, name))
                        logger.info(
                            "removed %s in %s, partly written by a node killed as "
                            "it wrote it",
                            name,
                            path,
                        )
                    continue
                if not name.startswith("r"):
                    continue
                full = os.path.join(path, name)
                if not has_signed_shape(name):
                    foreign.append(full)  # no name this node gives: never offered
                    continue
                info = os.lstat(full)  # its checks come when it is claimed
                if stat.S_ISREG(info.st_mode):
                    files.append((full, self._on_disk(info.st_size)))
        except OSError as exc:
            logger.warning("spool directory %s cannot be read, left: %s", path, exc)
            return None
        if foreign:
            # Counted as kept results, and in --kept-results-size, until a
            # client's claim checked them (an hour, if none comes).
            logger.warning(
                "%s in kept results %s %s not written by this node, and not "
                "offered: put there by something of the node's user (its jobs can "
                "write there) (removed)",
                counted(len(foreign), "file"),
                path,
                "is" if len(foreign) == 1 else "are",
            )
            for full in foreign:
                with contextlib.suppress(OSError):
                    os.unlink(full)
        try:
            # Written by the node, but its jobs can replace it (a FIFO hung the
            # node's start; a NaN expiry would break its loop's timers).
            meta = json.loads(read_own_file(os.path.join(path, "meta"), _META_LIMIT))
            spool = SpoolDir(path, *meta_fields(meta, path))
            spool.cut_short = meta.get("cut_short") is True
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if not files:
                logger.warning(
                    "spool directory %s is unreadable, removed: %s", path, exc
                )
                shutil.rmtree(path, ignore_errors=True)
                return None
            # Its expiry is unknown: the default from now (written again by the
            # keeper). Torn as its node died: its jobs may have ended with it.
            spool = SpoolDir(path, os.path.basename(path), cut_short=True)
            logger.warning(
                "spool directory %s: its meta file is damaged (%s; the node stopped "
                "while writing it?): offering its %s for %.0f s",
                path,
                exc,
                counted(len(files), "kept result"),
                spool.keep,
            )
        spool.files = files
        return spool


class _Unchecked(Exception):
    """A spooled file fails its check (`nodeserver.spoolcheck`)."""
