"""Computation directories a node is to clean up, noted on disk until it has.

A computation with ``cleanup`` (the default) has its directory removed as it closes.
A node killed before that (SIGKILL, the out-of-memory killer, a batch system ending
its cgroup, a power cut) left those directories, the jobs' files and all, until
someone ran ``--clean``: a node killed again and again filled its disk. So each such
directory is noted in `NOTES` under the node's directory while it exists, and the
next node started there while no other node runs there removes what is noted
(`Removals.sweep`), and the results its workers wrote into shared memory that
nobody read (``/dev/shm/dnr-*``, named after the directory: RAM until a reboot
otherwise). Directories a client kept (``cleanup=False``) are noted as kept: they are
the user's, as in dispy, and stay, even where another computation given the same
``dest_path`` noted its removal; but their results in shared memory that nobody
read are nobody's files, and go too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil

from dispynb.daemon import read_own_file
from dispynb.protocol import shm
from dispynb.wording import counted

logger = logging.getLogger(__name__)

#: The directory of the notes, under the node's directory (``dest_path``).
NOTES = ".remove"
#: Most bytes of a note (two paths).
_NOTE_LIMIT = 64 * 1024


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
                json.dump({"path": path, "home": home, "keep": keep}, handle)
            os.replace(partial, os.path.join(self._notes, name))
        except OSError as exc:
            logger.warning("cannot note %s for removal after a crash: %s", path, exc)
        return name

    def done(self, name: str) -> None:
        """The noted directory is gone (or kept on purpose): forget the note."""
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self._notes, name))

    def sweep(self) -> int:
        """Remove every directory noted (by nodes that did not exit cleanly) but
        those kept (and those holding one kept), and the results in shared memory
        of all, and forget the notes; return how many directories were removed.

        Call it only while no other node runs on this ``dest_path`` (its lock held
        exclusively): the notes of a running node name directories in use.
        """
        try:
            names = os.listdir(self._notes)
        except OSError:
            return 0
        removed = results = 0
        notes = [os.path.join(self._notes, name) for name in names]
        noted = [(note, *self._read(note)) for note in notes]
        # Two computations given one dest_path share its directory: one with
        # cleanup=False kept it for the user (as in dispy), so a note of another
        # removing it, or a directory holding it, is not followed (the sweep
        # followed the notes one by one, and removed what the kept one's jobs
        # wrote for the next cluster).
        kept = [os.path.realpath(path) for _, path, _, keep in noted if path and keep]
        for note, path, home, keep in noted:
            if path is not None:
                results += shm.unlink_results(shm.result_prefix(path))
            if (
                path is not None
                and not keep
                and os.path.isdir(path)
                and not _holds_any(path, kept)
            ):
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
                if home is not None:
                    remove_empty_parents(path, home)
            with contextlib.suppress(OSError):
                os.unlink(note)
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

    def _read(self, note: str) -> tuple[str | None, str | None, bool]:
        """The directory a note names and its home, each None unless it lies
        strictly within ``dest_path`` (a damaged note removes nothing), and whether
        the directory is kept (a note of an older node has no "keep": it noted
        only directories to remove)."""
        try:  # never a FIFO a job put there: a node's start hung on it
            entry = json.loads(read_own_file(note, _NOTE_LIMIT))
            path, home = entry["path"], entry["home"]
            keep = entry.get("keep", False) is not False
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None, None, True
        if not self._inside(path):
            return None, None, True
        return path, home if self._inside(home) else None, keep

    def _inside(self, path: object) -> bool:
        if not isinstance(path, str):
            return False
        root = os.path.realpath(self._dest)
        real = os.path.realpath(path)
        return real != root and os.path.commonpath([real, root]) == root


def _holds_any(path: str, kept: list[str]) -> bool:
    """Whether directory ``path`` is, or holds, one of the ``kept`` (real paths)."""
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, other]) == real for other in kept)


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
