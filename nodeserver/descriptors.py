"""The node server's file descriptors: whether a new computation fits in what is left
(and what to say when a descriptor or a process cannot be had, `explain`).

A computation costs the node server a descriptor for its process's control socket,
four per worker (its socket, the pidfd the node signals it through, and the two
files of its output below Python, `nodeserver.fdoutput`), and a few
more while it starts (the socket pair, the process's pidfd and pipes). At the
descriptor limit (``RLIMIT_NOFILE``, 1024 by default, less under ``prlimit`` or
systemd's ``LimitNOFILE=``) the kernel drops the worker sockets a computation
process passes (SCM_RIGHTS, ``MSG_CTRUNC``) and the process's start fails half way;
so a computation that would not fit is refused before it starts, with a message that
says how to make room (`shortage`), and computations already running keep theirs.
"""

from __future__ import annotations

import errno
import logging
import os
import resource

from dispynb.wording import counted

logger = logging.getLogger("nodeserver.descriptors")

#: Descriptors kept free for everything else: accepting and authenticating clients,
#: the file store, reading ``/proc``.
RESERVE = 16

#: Descriptors a computation takes beyond `PER_WORKER` per worker (control socket,
#: process).
PER_COMPUTATION = 4

#: Descriptors each worker takes: its socket, its pidfd, its two output files.
PER_WORKER = 4

_FIX = (
    "close other clusters on it, or raise the node's limit (ulimit -n before "
    "starting it, LimitNOFILE= in its systemd unit, prlimit --nofile)"
)


def limit() -> int | None:
    """The soft descriptor limit (None: unlimited)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def open_count() -> int | None:
    """Descriptors open in this process now (None: cannot tell, no ``/proc``)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return limit()  # not even one left to look
        return None


def shortage(workers: int) -> str | None:
    """Why a computation of ``workers`` workers cannot start here for want of
    descriptors (what to do about it), or None if it fits."""
    soft = limit()
    used = open_count()
    if soft is None or used is None:
        return None
    need = workers * PER_WORKER + PER_COMPUTATION
    if used + need + RESERVE <= soft:
        return None
    return (
        f"the node is short of file descriptors: {used} of its limit of {soft} are "
        f"open, and a computation of {counted(workers, 'worker')} needs {need} more "
        f"(besides {RESERVE} it keeps free): {_FIX}"
    )


class Admission:
    """Computations admitted or refused for want of descriptors, logged once per
    episode: the first refusal is a warning, the next ones (every client that
    tries meanwhile) are debug lines, until a computation fits again."""

    def __init__(self) -> None:
        self.refused = 0  # in this episode

    def refuse(self, name: str, workers: int) -> str | None:
        """Why computation ``name`` must be refused (`shortage`), or None."""
        short = shortage(workers)
        if short is None:
            if self.refused:
                logger.info(
                    "descriptors free again: %d computations were refused meanwhile",
                    self.refused,
                )
                self.refused = 0
            return None
        self.refused += 1
        log = logger.warning if self.refused == 1 else logger.debug
        log("refused computation %s: %s", name, short)
        return short


def explain(exc: OSError, what: str) -> str:
    """``what`` failed with ``exc``: the message, with the remedy when it is a
    limit: descriptors (EMFILE, or ENFILE: the whole system's) or processes (a
    fork's EAGAIN: the user's ``RLIMIT_NPROC``, or the system's)."""
    if exc.errno == errno.EMFILE:
        return f"{what}: the node is out of file descriptors (limit {limit()}): {_FIX}"
    if exc.errno == errno.ENFILE:
        return f"{what}: the system is out of file descriptors (fs.file-max)"
    if exc.errno == errno.EAGAIN:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NPROC)
        nproc = "none" if soft == resource.RLIM_INFINITY else soft
        return (
            f"{what}: the node's user cannot have another process (its limit "
            f"{nproc}, ulimit -u, or the system's kernel.pid_max / threads-max): "
            "jobs may hold them (processes they started); try again once they "
            "end, or raise the limit"
        )
    return f"{what}: {exc}"
