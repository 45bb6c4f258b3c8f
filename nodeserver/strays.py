"""Processes a job made its worker's siblings: children of the computation process
that it did not fork.

``clone(CLONE_PARENT)`` gives the new process the caller's parent: called from a
job (by ``ctypes``, one system call), it makes a child of the computation process,
outside the worker's tree, which the worker's subreaper never sees, and after
``setsid`` outside its process group too. Such a process outlived its job, every
kill but the cgroup's, and where no pids cgroup holds it, max_pids: its own forks
were counted under no worker (a job on a node without cgroups left 100 processes
running under max_pids=32).

The computation process forks nothing but its workers once its setup has run, so
every child it gains after that which is not a worker is a job's: `Strays` finds
them (from ``/proc``, at each of the supervisor's wake-ups: twice a second and at
every SIGCHLD) and ends each with its descendants. The children setup started are
noted when the supervisor starts and left alone (a process that took the pid of
one of them after it ended is told apart by its start time). From then on the
computation process is a child subreaper, so that what a stray leaves orphaned
comes to it as another stray, not to the node.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
from collections.abc import Collection

from nodeserver.containment import (
    become_subreaper,
    children,
    descendants,
    kill_pinned,
    pin,
)

logger = logging.getLogger("nodeserver.compute")

#: Rounds of stopping a stray's descendants before they are killed (one that forks
#: as fast as it can may outrun one round).
_STOP_ROUNDS = 50


def _stat_field(pid: int, index: int) -> int | None:
    """Field ``index`` + 3 of proc(5)'s ``/proc/pid/stat``; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    # Fields after the command name, which may hold spaces and parentheses.
    fields = stat[stat.rindex(b")") + 2 :].split()
    try:
        return int(fields[index])
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot); None if it is gone."""
    return _stat_field(pid, 19)  # field 22 of proc(5)


def _group(pid: int) -> int | None:
    """The process group of ``pid`` (a zombie's too); None if it is gone."""
    return _stat_field(pid, 2)  # field 5 of proc(5)


def end_tree(pid: int) -> int:
    """SIGKILL child ``pid`` and its descendants, stopped first so that none forks
    past the kill, and reap ``pid``; how many processes were ended.

    ``pid`` is this process's child: its number is not reused before it is
    reaped here. Its descendants are held by pidfds from the moment they are seen.
    """
    seen: set[int] = set()
    held: list[int] = []
    for _ in range(_STOP_ROUNDS):
        new = [p for p in (pid, *descendants(pid)) if p not in seen]
        if not new:
            break
        seen.update(new)
        fds = pin(new)
        for fd in fds:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGSTOP)
        held.extend(fds)
    kill_pinned(held)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    return len(seen)


class Strays:
    """The children of computation process ``parent`` that are neither its workers
    nor there when it was made (its setup's): see the module."""

    def __init__(self, parent: int, name: str) -> None:
        self._parent = parent
        self._name = name
        # A stray that forks and exits at once hands its children to the nearest
        # subreaper: this process from now on, so they are strays here too (they
        # went to the node, which kills its orphans only at its next SIGCHLD).
        become_subreaper()
        self._known = {pid: start_time(pid) for pid in children(parent)}
        #: Workers that ended lately (each is its own process group): what their
        #: jobs started in their group and outlived them comes here, as strays.
        self._ended_workers: collections.deque[int] = collections.deque(maxlen=256)
        #: Strays ended lately: a group one of them led (after ``setsid``) is
        #: theirs, and what it left orphaned comes here as strays of that group.
        self._ended_strays: collections.deque[int] = collections.deque(maxlen=256)
        #: Processes ended so far (strays and their descendants).
        self.ended = 0

    def worker_ended(self, pid: int) -> None:
        """Worker ``pid`` ended: a process its job started may outlive it."""
        self._ended_workers.append(pid)

    def end(self, workers: Collection[int]) -> int:
        """End every stray (with its descendants) and reap it; how many strays."""
        strays = [
            pid
            for pid in children(self._parent)
            if pid not in workers
            and (pid not in self._known or start_time(pid) != self._known[pid])
        ]
        for pid in strays:
            how = self._how(pid, workers, strays)
            ended = end_tree(pid)
            self._ended_strays.append(pid)
            (logger.debug if self.ended else logger.warning)(
                "computation %r: a job started process %d %s: killed with %d "
                "process(es) it started (later ones are logged at debug level)",
                self._name,
                pid,
                how,
                ended - 1,
            )
            self.ended += ended
        return len(strays)

    def _how(self, pid: int, workers: Collection[int], strays: list[int]) -> str:
        """How stray ``pid`` came here, as far as its process group tells: a
        running worker's (the job made it that worker's sibling), an ended
        worker's (it outlived its worker: orphaned to this subreaper), another
        stray's (ended now or before: orphaned by it; a group's number is not
        given to a new process while the group has members, so it is that
        stray's), or its own or another (it left its worker's group, then
        either)."""
        group = _group(pid)
        if group in workers:
            return "outside its worker (clone with CLONE_PARENT)"
        if group in self._ended_workers:
            return f"that outlived its worker (process {group}, which ended first)"
        if group != pid and (group in strays or group in self._ended_strays):
            return (
                f"that outlived process {group}, which the job started outside "
                "its worker and which led its process group"
            )
        return (
            "outside its worker's process group (setsid), which either outlived "
            "its worker or was made with clone(CLONE_PARENT)"
        )


__all__ = ["Strays", "end_tree", "start_time"]
