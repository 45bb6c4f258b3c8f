"""Files that jobs send their client (``dispy_send_file``) through an engine that
hands them over whole (Dask, Ray): saved under the cluster's ``files_dir``."""

from __future__ import annotations

import errno
import logging
import os
import posixpath

from dispynb.clusterjournal import DEFAULT_PREFIX
from dispynb.errors import DispynbError, ProtocolError
from dispynb.journalfile import open_journal_names
from dispynb.protocol.files import safe_relative_path, write_inside

#: Why a write failed, as the job that sent the file is told: what to do about it.
_FULL = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def refuse_recovery_file(base_dir: str, path: str) -> None:
    """Raise `ProtocolError` if a job's file ``path``, saved under ``base_dir``,
    would replace a recovery journal of this client (or a file SQLite keeps beside
    it), or be a default recovery file (``_dispy_*``) in the working directory,
    where ``recover_jobs()`` looks for the newest one.

    ``recover_jobs`` unpickles what a journal holds, trusting it as the client's
    own: a file a node planted there would get past ``result_types`` and run its
    code in the client's process.
    """
    folder, name = posixpath.split(safe_relative_path(path))
    folder = os.path.realpath(os.path.join(base_dir, folder))
    target = os.path.join(folder, name)
    if target in open_journal_names():
        raise ProtocolError(
            f"it would replace the client's recovery file {target} "
            "(recover_jobs reads it): send it under another name"
        )
    if name.startswith(DEFAULT_PREFIX) and folder == os.path.realpath(os.getcwd()):
        raise ProtocolError(
            f"{target} would pass for a recovery file of the client's "
            f"(recover_jobs() reads the newest {DEFAULT_PREFIX}* there): send it "
            "under another name"
        )


def unsaved_file(base_dir: str, path: str, exc: Exception) -> str:
    """Why the client could not save a job's file ``path`` under ``base_dir``, and
    what to do about it (for the job's ``dispy_send_file`` and the client's log)."""
    where = f"{path!r} under {base_dir}"
    if not isinstance(exc, OSError):
        return f"the client did not save {where}: {exc}"
    reason = exc.strerror or str(exc)
    if exc.errno in _FULL:
        return (
            f"the client's disk is full ({reason}) writing {where}: free space "
            "there, or give the cluster a files_dir on a disk with room"
        )
    if exc.errno == errno.EFBIG:
        return (
            f"the client may not write a file that large ({reason}: its file size "
            f"limit, ulimit -f) writing {where}: raise the client's limit, or "
            "send smaller files"
        )
    if exc.errno in _DENIED:
        return (
            f"the client cannot write {where} ({reason}): make the folder "
            "writable, or give the cluster a writable files_dir"
        )
    return f"the client could not write {where}: {reason}"


def save_job_file(
    files_dir: str | None,
    key: int,
    path: str,
    data: bytes | memoryview,
    *,
    logger: logging.Logger,
    node: str = "",
) -> str:
    """Save the file job ``key`` sent as ``path`` under ``files_dir`` (the working
    directory if None); return why it was not saved ("" once it was), for the job.
    A file that cannot be saved (a path leaving the folder, a full disk) is logged
    on the engine's ``logger``, never raised: the job goes on. The log records
    name the job, and ``node`` (the worker that sent it) when given."""
    base_dir = files_dir or os.getcwd()
    sender = f"job {key} on node {node}" if node else f"job {key}"
    try:
        refuse_recovery_file(base_dir, path)
        saved = write_inside(base_dir, path, memoryview(data))
    except (DispynbError, OSError) as exc:
        error = unsaved_file(base_dir, path, exc)
        logger.warning("file from %s not saved: %s", sender, error)
        return error
    # (debug: a line a file would fill a script's stderr; dispy's says nothing)
    logger.debug("saved %s from %s", saved, sender)
    return ""
