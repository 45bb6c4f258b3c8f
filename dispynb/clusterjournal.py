"""What a `JobCluster` writes for `recover_jobs`: its own ``recover_file``, or the
process's default recovery file (dispy's ``_dispy_<timestamp>``)."""

from __future__ import annotations

import errno
import glob
import logging
import os
import secrets
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from dispynb.errors import ConfigurationError
from dispynb.job import DispyJob
from dispynb.journal import Journal
from dispynb.tracebacks import LazySourceMap

logger = logging.getLogger("dispynb.recovery")

#: Name prefix of default recovery files, in the current directory (dispy's).
DEFAULT_PREFIX = "_dispy_"

_default_lock = threading.Lock()
_default: Journal | None = None


def default_recovery_applies(nodes: Any) -> bool:
    """Whether a cluster given no ``recover_file`` writes dispy's default one.

    Scripts do, as dispy's clients. Not in notebooks and interactive sessions (no
    ``_dispy_*`` files among the notebooks; a restarted kernel frees its nodes'
    CPUs instead of leaving its jobs running for an hour), nor on a `LocalCluster`
    (its nodes end with this process). ``recover_file=...`` asks for it anywhere.
    """
    if getattr(nodes, "secret", None) is not None:  # a LocalCluster
        return False
    ipython = sys.modules.get("IPython")
    in_ipython = ipython is not None and ipython.get_ipython() is not None
    return not (in_ipython or hasattr(sys, "ps1"))


_default_users = 0


def acquire_default_journal() -> Journal | None:
    """The recovery file of this process's clusters that were given no
    ``recover_file``: ``_dispy_<YYYYmmddHHMMSS>_<pid>`` in the current directory
    (0600), as dispy writes one. It records computations and nodes only, never jobs
    or secrets; the nodes keep what the computations' jobs return after this process
    is gone, for ``recover_jobs()``.

    Returns None (logged) if the file cannot be created: the cluster then works
    without it. Release with `release_default_journal`.
    """
    global _default, _default_users
    with _default_lock:
        if _default is None:
            name = time.strftime(f"{DEFAULT_PREFIX}%Y%m%d%H%M%S") + f"_{os.getpid()}"
            try:
                _default = Journal(os.path.abspath(name))
            except (OSError, sqlite3.Error, ConfigurationError) as exc:
                logger.warning(
                    "cannot write the recovery file %s in %s (%s): recover_jobs() "
                    "will not find this client's jobs; give recover_file=...",
                    name,
                    os.getcwd(),
                    exc,
                )
                return None
            logger.debug("recovery information in %s", _default.path)
        _default_users += 1
        return _default


def release_default_journal(journal: Journal, recovery_id: str, clean: bool) -> None:
    """A cluster using the default recovery file closed (``clean``: all its jobs
    were done); the last one removes the file if nothing is left to recover."""
    global _default, _default_users
    with _default_lock:
        if clean:
            try:
                journal.forget(recovery_id)
            except (OSError, sqlite3.Error) as exc:  # a full disk: recovers nothing
                logger.warning(
                    "cannot update the recovery file %s: %s", journal.path, exc
                )
        _default_users -= 1
        if _default_users > 0 or journal is not _default:
            return
        _default = None
        journal.close(remove=not journal.computations())


class ClusterJournal:
    """What one `JobCluster` writes for `recover_jobs`.

    ``recover_file=PATH``: every job, its node and its outcome go to PATH. dispy's
    default (None): in scripts (`default_recovery_applies`), the computation and its
    nodes go to the process's shared ``_dispy_*`` file. ``False``, or an engine that
    cannot keep results for a client that went away (``can_recover`` False): nothing.
    Methods do nothing when nothing is journaled. A write that fails (a full disk)
    never fails the cluster: it is logged, once until writes work again, and what
    it recorded cannot be recovered (`done_many` says so, for the results a node
    keeps until they are journaled).
    """

    def __init__(
        self, recover_file: str | bool | None, nodes: Any, can_recover: bool
    ) -> None:
        #: Whether every job is journaled (``recover_file=PATH``).
        self.jobs = isinstance(recover_file, str)
        self._journal: Journal | None = None
        self._failures = 0  # writes that failed (the first one logged)
        #: Jobs whose submission could not be written: their ends have no row.
        self._unrecorded: set[int] = set()
        if isinstance(recover_file, str):
            try:
                self._journal = Journal(recover_file)
            except (OSError, sqlite3.Error) as exc:
                raise ConfigurationError(
                    f"recover_file {recover_file!r} cannot be written: {exc}; give "
                    f"one {_where(exc)}, or recover_file=False"
                ) from None
        elif recover_file is None and can_recover and default_recovery_applies(nodes):
            self._journal = acquire_default_journal()
        #: The id nodes keep the computation's results under ('': none).
        self.recovery_id = secrets.token_hex(16) if self._journal is not None else ""

    def computation(self, name: str, sources: LazySourceMap) -> None:
        """The computation starts: its name, and where its code comes from (so that
        ``recover_jobs`` shows the tracebacks of jobs that failed while the client
        was gone at the script's lines, as the cluster shows them)."""
        if self._journal is None:
            return
        self._write(self._journal.computation, self.recovery_id, name)
        try:
            source_map = sources.built().to_json()
        except Exception as exc:  # only the tracebacks' lines are lost
            logger.debug("no source map for the recovery file: %s", exc)
            return
        self._write(self._journal.sources, self.recovery_id, source_map)

    def node(self, node_id: str) -> None:
        if self._journal is not None:
            self._write(self._journal.node, self.recovery_id, node_id)

    def sent(self, keys: list[int], node_id: str) -> None:
        if self._journal is not None and self.jobs:
            self._write(self._journal.sent, self.recovery_id, keys, node_id)

    def submitted(self, key: int, job: DispyJob) -> None:
        journal = self._journal
        if (
            journal is not None
            and self.jobs
            and not self._write(journal.submitted, self.recovery_id, key, job)
        ):
            self._unrecorded.add(key)

    def done(self, key: int, job: DispyJob) -> None:
        if self._journal is not None and self.jobs:
            self._unrecorded.discard(key)
            self._write(self._journal.done, self.recovery_id, key, job)

    def done_many(self, jobs: list[tuple[int, DispyJob]]) -> bool:
        """Jobs ended together (``(key, job)`` each): one transaction. False if it
        failed (logged), or some of them were never recorded: not all journaled."""
        if self._journal is not None and self.jobs:
            written = self._write(self._journal.done_many, self.recovery_id, jobs)
            if self._unrecorded:
                keys = {key for key, _job in jobs}
                if keys & self._unrecorded:
                    self._unrecorded -= keys
                    return False
            return written
        return True

    def renamed(self, key: int, job: DispyJob) -> None:
        if self._journal is not None and self.jobs:
            self._write(self._journal.renamed, self.recovery_id, key, job)

    def _write(self, record: Callable[..., None], *args: Any) -> bool:
        """``record(*args)``; False if the file could not be written (the first
        failure is logged, the count of them at `close`: a disk that is nearly
        full fails some writes and not others)."""
        try:
            record(*args)
        except (OSError, sqlite3.Error) as exc:
            self._failures += 1
            log = logger.warning if self._failures == 1 else logger.debug
            log(
                "cannot write the recovery file %s (%s): while this lasts, "
                "recover_jobs() after a crash misses what is not written (the "
                "results still come back here, and nodes keep them until they are); "
                "free room on its disk",
                self._journal.path if self._journal is not None else "",
                exc,
            )
            return False
        return True

    def close(self, clean: bool) -> None:
        """The cluster closed; ``clean``: every job was done (nothing to recover,
        so its records are removed, as dispy removes its file)."""
        journal = self._journal
        if journal is None:
            return
        if self._failures > 1:
            logger.warning(
                "%d writes to the recovery file %s failed in all",
                self._failures,
                journal.path,
            )
        try:
            if self.jobs:
                # The file may hold another cluster's computation too (the same
                # recover_file given to two): then only this one's records go.
                shared = clean and journal.shared(self.recovery_id)
                if shared:
                    self._write(journal.forget, self.recovery_id)
                journal.close(remove=clean and not shared)
            else:
                release_default_journal(journal, self.recovery_id, clean=clean)
        finally:
            self._journal = None


#: Where a recover_file goes, by the error that kept one from being written.
_WHERE = {
    errno.ENOENT: "in a directory that exists",
    errno.EISDIR: "that is a file, not a directory",
    errno.EACCES: "in a directory you can write to",
    errno.EPERM: "in a directory you can write to",
    errno.EROFS: "on a disk you can write to",
}


def _where(exc: BaseException) -> str:
    """Where to give a recover_file that ``exc`` kept from being written (a full
    disk, SQLite's error, and any other: one with room)."""
    if isinstance(exc, OSError) and exc.errno in _WHERE:
        return _WHERE[exc.errno]
    return "on a disk with room"


def latest_recover_file(directory: str = ".") -> str | None:
    """The newest default recovery file in ``directory`` (what dispy's
    ``recover_jobs()`` opens), or None.

    Only the user's own regular files count: in a directory others can write to,
    one of theirs named as a newer one (``_dispy_99999999999999_1``) was taken,
    and refused, instead of the user's; a symlink of theirs made ``recover_jobs``
    recover another of the user's journals. Those skipped are logged."""
    names, skipped = [], []
    for name in glob.glob(os.path.join(glob.escape(directory), DEFAULT_PREFIX + "*")):
        if name.endswith(("-wal", "-shm", "-journal")):
            continue
        try:
            info = os.lstat(name)
        except OSError:
            continue  # removed meanwhile
        if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
            names.append(name)
        else:
            skipped.append(os.path.basename(name))
    if skipped:
        logger.warning(
            "recover_jobs: skipped %s in %s, not regular files of yours (another "
            "user's, or symlinks: someone who can write there may have put them)",
            ", ".join(sorted(skipped)[:5]) + (" ..." if len(skipped) > 5 else ""),
            os.path.abspath(directory),
        )
    return max(names, key=os.path.basename) if names else None
