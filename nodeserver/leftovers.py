"""Computation directories a node is to clean up, noted on disk until it has.

A computation with ``cleanup`` (the default) has its directory removed as it closes.
A node killed before that (SIGKILL, the out-of-memory killer, a batch system ending
its cgroup, a power cut) left those directories, the jobs' files and all, until
someone ran ``--clean``: a node killed again and again filled its disk. So each such
directory is noted in `NOTES` under the node's directory while it exists, with the
node that noted it, and the next node started there removes what the nodes gone
noted (`Removals.sweep`: all that is noted if no other node runs there), and the
results their workers wrote into shared memory that nobody read
(``/dev/shm/dnr-*``, named after the directory: RAM until a reboot otherwise).
Directories a client kept (``cleanup=False``) are noted as kept: they are the
user's, as in dispy, and stay, even where another computation given the same
``dest_path`` noted its removal; but their results in shared memory that nobody
read are nobody's files, and go too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil

from dispynb.daemon import read_own_file
from dispynb.protocol import shm
from dispynb.wording import counted
from nodeserver.strays import start_time

logger = logging.getLogger(__name__)

#: The directory of the notes, under the node's directory (``dest_path``).
NOTES = ".remove"
#: Most bytes of a note (two paths).
_NOTE_LIMIT = 64 * 1024


@dataclasses.dataclass(frozen=True)
class _Note:
    """A note as `Removals.sweep` reads it (see `Removals._read`)."""

    file: str
    path: str | None
    home: str | None
    keep: bool
    owner_gone: bool


def _identity() -> list[object]:
    """This process as a note names its node: its pid, when it started (a pid is
    reused), the machine's boot and the pid namespace (where that pid means it)."""
    pid = os.getpid()
    return [pid, start_time(pid), shm.boot_id(), shm.pid_namespace()]


def _gone(owner: object) -> bool:
    """Whether the node a note names (`_identity`) is gone. Only a node of this
    machine's boot and pid namespace can be told gone: a --dest-path on a file
    system shared with other machines (NFS), or containers, holds the notes of
    nodes running there, whose pids mean nothing here. Not gone either: a note
    that does not say (an older node's)."""
    if not isinstance(owner, list) or len(owner) != 4:
        return False
    pid, started, boot, namespace = owner
    if type(pid) is not int or pid <= 0 or not boot or not namespace:
        return False
    if boot != shm.boot_id() or namespace != shm.pid_namespace():
        return False
    return bool(start_time(pid) != started)


class Removals:
    """The notes of the directories to remove under one node's ``dest_path``."""

    def __init__(self, dest_path: str) -> None:
        self._dest = dest_path
        self._notes = os.path.join(dest_path, NOTES)

    def note(self, path: str, home: str | None, *, keep: bool = False) -> str:
        """Note that ``path`` is to be removed, and the directories between it and
        ``home`` once empty (``keep``: only the results in shared memory of the
        computation in ``path``); return the note's name for `done`.

        Best effort: a note that cannot be written is logged, and the directory is
        then left to ``--clean`` if the node is killed, as before notes.
        """
        name = secrets.token_hex(8)
        try:
            os.makedirs(self._notes, mode=0o700, exist_ok=True)
            partial = os.path.join(self._notes, f".{name}")
            with open(partial, "x", encoding="utf-8") as handle:
                json.dump(
                    {"path": path, "home": home, "keep": keep, "node": _identity()},
                    handle,
                )
            os.replace(partial, os.path.join(self._notes, name))
        except OSError as exc:
            logger.warning("cannot note %s for removal after a crash: %s", path, exc)
        return name

    def done(self, name: str) -> None:
        """The noted directory is gone (or kept on purpose): forget the note."""
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self._notes, name))

    def sweep(self, *, alone: bool = True) -> int:
        """Remove every directory noted by nodes that did not exit cleanly but
        those kept (and those holding one kept), and the results in shared memory
        of all, and forget the notes; return how many directories were removed.

        ``alone``: no other node runs on this ``dest_path`` (its lock held
        exclusively), so every note is a dead node's. Otherwise (nodes of a user
        share its default) only the notes of nodes gone are followed: a node
        killed beside others left its directories and results until every node
        there had stopped, for good on a machine that always runs one. A path a
        running node noted too (two nodes given one ``dest_path`` by a client) is
        left, and of results only those whose writer (named in them) is gone go.
        """
        try:
            names = os.listdir(self._notes)
        except OSError:
            return 0
        if not alone:  # (a note being written, ".NAME", may be a running node's)
            names = [name for name in names if not name.startswith(".")]
        removed = results = 0
        noted = [self._read(os.path.join(self._notes, name)) for name in names]
        # Two computations given one dest_path share its directory: one with
        # cleanup=False kept it for the user (as in dispy), so a note of another
        # removing it, or a directory holding it, is not followed (the sweep
        # followed the notes one by one, and removed what the kept one's jobs
        # wrote for the next cluster). Nor is one a running node uses.
        in_use = [
            os.path.realpath(n.path)
            for n in noted
            if n.path and not alone and not n.owner_gone
        ]
        kept = in_use + [os.path.realpath(n.path) for n in noted if n.path and n.keep]
        for entry in noted:
            path = entry.path
            if not alone and not entry.owner_gone:
                continue  # a running node's (or an older node's: unknown)
            if path is not None and os.path.realpath(path) not in in_use:
                results += shm.unlink_results(
                    shm.result_prefix(path), only_dead_writers=not alone
                )
            if (
                path is not None
                and not entry.keep
                and os.path.isdir(path)
                and not _overlaps(path, kept)
            ):
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
                if entry.home is not None:
                    remove_empty_parents(path, entry.home)
            with contextlib.suppress(OSError):
                os.unlink(entry.file)
        if removed:
            logger.info(
                "removed %d director%s left by a node that did not exit cleanly in %s",
                removed,
                "y" if removed == 1 else "ies",
                self._dest,
            )
        if results:
            logger.info(
                "removed %s in shared memory (%s) that a node that did not exit "
                "cleanly in %s left unread",
                counted(results, "job result"),
                shm.SHM_DIR,
                self._dest,
            )
        return removed

    def _read(self, note: str) -> _Note:
        """The note in file ``note``: the directory it names and its home, each
        None unless it lies strictly within ``dest_path`` (a damaged note removes
        nothing), whether the directory is kept (a note of an older node has no
        "keep": it noted only directories to remove), and whether the node that
        wrote it is gone (unknown for an older node's: not)."""
        try:  # never a FIFO a job put there: a node's start hung on it
            entry = json.loads(read_own_file(note, _NOTE_LIMIT))
            path, home = entry["path"], entry["home"]
            keep = entry.get("keep", False) is not False
            gone = _gone(entry.get("node"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return _Note(note, None, None, True, True)
        if not self._inside(path):
            return _Note(note, None, None, True, gone)
        return _Note(note, path, home if self._inside(home) else None, keep, gone)

    def _inside(self, path: object) -> bool:
        if not isinstance(path, str):
            return False
        root = os.path.realpath(self._dest)
        real = os.path.realpath(path)
        return real != root and os.path.commonpath([real, root]) == root


def _overlaps(path: str, others: list[str]) -> bool:
    """Whether directory ``path`` is, holds, or lies in one of ``others`` (real
    paths)."""
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, other]) in (real, other) for other in others)


def remove_empty_parents(path: str, home: str) -> None:
    """Remove the directories above ``path`` that are empty, up to ``home`` (a
    directory above it) included: a node that serves clients for months does not
    keep one empty directory per session it ever had."""
    home = os.path.normpath(home)
    parent = os.path.dirname(os.path.normpath(path))
    while parent.startswith(home + os.sep) or parent == home:
        try:
            os.rmdir(parent)
        except OSError:
            return  # not empty (another computation, files kept), or gone
        parent = os.path.dirname(parent)
