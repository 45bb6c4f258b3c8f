"""Keeping a job's processes inside the job: process groups, a subreaper, pids cgroups.

Every worker is the leader of its own process group and a child subreaper, so that
whatever a job starts (``os.fork``, ``subprocess``, ``multiprocessing``, a daemon that
double-forks) stays in the worker's group or, once orphaned, comes back to the worker
rather than to init. Then:

- when a job ends, the worker kills what it left running (`end_leftovers`: one
  ``waitid`` system call when the job started nothing, the usual case);
- when a worker is killed (timeout, cancel) or stopped (cluster close), the computation
  process kills its whole group, and its cgroup (`kill_group`); the node server,
  which did not fork it, kills it (timeout, cancel) only through a pidfd of it
  (`HeldWorker`), never by a pid that may have come round to another process;
- where a pids cgroup can be created (cgroup v1's ``pids`` hierarchy, or a cgroup v2
  tree with the ``pids`` controller delegated: we check, we never assume), each worker
  gets its own with ``pids.max`` set: a fork bomb stops at the limit. The cgroup is
  made once per worker, not per job, so the hot path pays nothing for it. Without
  one, the limit is enforced by counting each worker's processes (a node logs that).

Moving a process into a cgroup (a ``cgroup.procs`` write) is cheap except that, on
cgroup v1, the first move after a quiet spell waits for an RCU grace period (about
10-20 ms here; moves in quick succession then cost 0.1-0.2 ms). A computation's first
worker must not pay that on the way to the first job: the node server probes the
cgroup root once (`node_pids_root`) and moves each new computation process into a
fresh cgroup while the process is still importing (`place_in_new_cgroup`), so the
first worker is forked inside a cgroup of its own. See `nodeserver.compute`.

A process that leaves the worker's group with ``setsid`` is still found through the
subreaper at the job's end, and through the cgroup where there is one.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import select
import signal
import threading
import time
from collections.abc import Iterator

from dispynb.daemon import load_prctl

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

#: Rounds of listing and killing a job's leftovers before giving up (a fork bomb
#: without a pids cgroup may outrun one round).
_KILL_ROUNDS = 50

#: Environment variable that turns pids cgroups off (``off``).
NO_CGROUP_ENV = "DISPYNB_PIDS_CGROUP"

#: Seconds `remove_cgroup` waits for killed tasks to leave a cgroup.
_CGROUP_EMPTY_WAIT = 2.0


def become_group_leader() -> None:
    """In a new worker: lead a process group of its own, and adopt orphans."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    prctl = load_prctl()
    if prctl is not None:
        prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def become_subreaper() -> bool:
    """In the node server: adopt the orphaned descendants (a dead zygote's
    computation processes) instead of init; False where that is not possible."""
    prctl = load_prctl()
    return prctl is not None and prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


class NodeGone(BaseException):
    """Raised in a computation process whose node server died (`NodeWatch`); a
    BaseException, so that the job code or setup it interrupts does not take it."""


#: Seconds between looks at the parent where the node cannot be followed by pidfd.
_PARENT_POLL = 0.5


class NodeWatch:
    """In a computation process: its node server's life, followed without signals.

    The node's death is seen through a pidfd of the node (readable once it exited;
    Linux 5.3+) or, without one, by the parent changing: never through a signal,
    whose disposition the user's setup or job may change (``nohup``-style code
    ignores SIGHUP). While the computation's own code runs in this process (setup,
    cleanup: `guard`), a thread follows the node and, once it is gone, kills every
    descendant of this process and exits; between them, the supervisor's loop
    selects on `fd`. A dead zygote's computation process is adopted by the node
    (its subreaper) and goes on: it is the node that is followed, not the parent.
    """

    def __init__(self, node: int, parent: int | None = None) -> None:
        self.node = node
        self._parents = (node,) if parent is None else (node, parent)
        try:
            self.fd: int | None = os.pidfd_open(node)
        except (AttributeError, OSError):  # no pidfd here, or the node is gone
            self.fd = None
        self._stop_r, self._stop_w = os.pipe()

    def lives(self) -> bool:
        """Whether the node server still runs (and is this process's parent, or
        its zygote is: then the pidfd is the node's, not a reused pid's)."""
        if os.getppid() not in self._parents:
            return False
        return self.fd is None or not select.select([self.fd], [], [], 0)[0]

    def _wait(self, stop: int | None) -> bool | None:
        """Block until the node dies (True), ``stop`` is readable (None) or `guard`
        ends (False)."""
        fds = [self._stop_r] if self.fd is None else [self._stop_r, self.fd]
        if stop is not None:
            fds.append(stop)
        timeout = _PARENT_POLL if self.fd is None else None
        while True:
            ready = select.select(fds, [], [], timeout)[0]
            if self._stop_r in ready:
                os.read(self._stop_r, 1)
                return False
            if stop is not None and stop in ready:
                return None
            if ready or not self.lives():
                return True

    @contextlib.contextmanager
    def guard(self, stop: int | None = None) -> Iterator[None]:
        """While the body runs (the user's code: setup, cleanup), end this process
        and all its descendants as soon as the node dies, or once descriptor
        ``stop`` is readable: the control channel during setup, where the node
        writes (`Shutdown`) or hangs up only to close the computation."""
        thread = threading.Thread(
            target=self._follow, args=(stop,), name="node-watch", daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            os.write(self._stop_w, b"x")
            thread.join()

    def _follow(self, stop: int | None) -> None:
        gone = self._wait(stop)
        if gone is False:
            return
        # The node's death is its clients' to report (see compute.main).
        if gone:
            logger.info("computation process: node server gone; stopping")
        else:  # the user's code does not read the channel: it could run for hours
            logger.info("computation process: closed by the node; stopping")
        end_leftovers()
        os._exit(1 if gone else 0)  # closed: as after a Shutdown

    def close(self) -> None:
        """Release the descriptors (before the process exits, or in a worker)."""
        for fd in (self.fd, self._stop_r, self._stop_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = None


def end_leftovers() -> int:
    """Kill and reap every process the job left behind; how many there were.

    Called by the worker after each job. The fast path (no child at all) is one
    ``waitid`` system call.
    """
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return 0
    killed: set[int] = set()
    for _ in range(_KILL_ROUNDS):
        pids = descendants(os.getpid())
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.update(pids)
        # Reap them (orphaned grandchildren come to us: we are their subreaper).
        while True:
            try:
                pid, _status = os.waitpid(-1, 0 if pids else os.WNOHANG)
            except ChildProcessError:
                return len(killed)
            if pid == 0:
                break
        if not pids and not descendants(os.getpid()):
            break
    return len(killed)


def children(pid: int) -> list[int]:
    """The children of process ``pid`` (of all its threads)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        with (
            contextlib.suppress(OSError, ValueError),
            open(f"/proc/{pid}/task/{task}/children") as handle,
        ):
            found.extend(int(c) for c in handle.read().split())
    return found


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (through /proc's children lists)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as handle:
                    children = [int(c) for c in handle.read().split()]
            except OSError:
                continue
            found.extend(children)
            pending.extend(children)
    return found


def deaf_to(pid: int, signum: int) -> bool:
    """Whether process ``pid`` ignores ``signum`` or its main thread blocks it (the
    ``SigIgn`` and ``SigBlk`` masks of ``/proc/PID/status``); False if unknown (no
    such process, no /proc)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            lines = status.read().splitlines()
    except OSError:
        return False
    bit = 1 << (signum - 1)
    for line in lines:
        field, _, value = line.partition(":")
        if field in ("SigIgn", "SigBlk") and int(value.strip() or "0", 16) & bit:
            return True
    return False


def kill_group(pgid: int, cgroup: str | None) -> None:
    """SIGKILL worker ``pgid``'s descendants, its process group and every task of
    ``cgroup`` (if any).

    Only for the worker's parent, before it reaps the worker: until then the pid
    cannot be another process's. Anyone else holds the worker (`HeldWorker`).

    The descendants are read first, while the worker lives: they include what its
    job started that left the group (``setsid``) and that the worker adopted as
    their subreaper; once the worker is dead they belong to init, and without a
    cgroup nothing would find them again.
    """
    for pid in descendants(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    if cgroup is not None:
        for pid in cgroup_pids(cgroup):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def pin(pids: list[int]) -> list[int]:
    """Pidfds of those of ``pids`` still running: `kill_pinned` kills them later
    without hitting a process that reused a pid meanwhile."""
    fds = []
    for pid in pids:
        with contextlib.suppress(OSError):
            fds.append(os.pidfd_open(pid))
    return fds


def kill_pinned(fds: list[int]) -> None:
    """SIGKILL the processes `pin` found (those still running) and close the fds."""
    for fd in fds:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        os.close(fd)


def open_pidfd(pid: int) -> int | None:
    """A pidfd of process ``pid``, or None where there is none (no pidfd_open: a
    kernel before 5.3, not Linux; or the process is gone)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


#: ``pidfd_send_signal``'s flag for the process group whose id is the pidfd's pid,
#: the kernel's own record of it, not a number (Linux 6.9+; EINVAL before).
_PIDFD_SIGNAL_PROCESS_GROUP = 1 << 2


class HeldWorker:
    """A worker seen from the node server, which did not fork it (its computation
    process did), held by a pidfd that process opened before it could reap it.

    The node signals the worker only through the pidfd: by the time it acts (a
    cancel's grace, a paused or busy node) the worker may have died, been reaped
    and its pid come round to an unrelated process, and a kill by number would hit
    that process, its children and its group. A worker that has exited is left to
    its computation process, which kills its group before reaping it
    (`kill_group`). Without a pidfd (``pid_fd`` None: a kernel before 5.3) the
    worker is signalled by pid, as before.
    """

    def __init__(self, pid: int, pid_fd: int | None) -> None:
        self.pid = pid
        self._fd = pid_fd
        self._closed = False

    def exited(self) -> bool:
        """Whether the worker has exited (then its pid may be another process's)."""
        if self._closed:
            return True
        if self._fd is None:
            return False  # cannot tell
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return bool(poller.poll(0))

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the worker (nothing if it has exited)."""
        if self._closed:
            return
        with contextlib.suppress(ProcessLookupError):
            if self._fd is None:
                os.kill(self.pid, signum)
            else:
                signal.pidfd_send_signal(self._fd, signum)

    def kill_tree(self) -> bool:
        """SIGKILL the worker, its descendants and its process group; False, and
        nothing signalled, if it had exited already."""
        if self._closed:
            return False
        if self._fd is None:
            kill_group(self.pid, None)
            return True
        pinned = pin(descendants(self.pid))
        if self.exited():
            for fd in pinned:
                os.close(fd)
            logger.info(
                "worker %d had exited: not signalled by its pid, which may be "
                "another process's now (its computation process ends its group)",
                self.pid,
            )
            return False
        # It lived after its descendants were read: they were its own.
        self._kill_group()
        self.signal(signal.SIGKILL)
        kill_pinned(pinned)
        return True

    def _kill_group(self) -> None:
        assert self._fd is not None
        try:
            signal.pidfd_send_signal(
                self._fd, signal.SIGKILL, None, _PIDFD_SIGNAL_PROCESS_GROUP
            )
            return
        except ProcessLookupError:
            return  # nobody left in the group
        except OSError:  # EINVAL: a kernel before 6.9; by number, checked just now
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def close(self) -> None:
        """Release the pidfd (the worker is gone from the node's view); later
        signals do nothing."""
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --- pids cgroups ------------------------------------------------------------------


def find_pids_root() -> str | None:
    """A directory under which this process may create pids cgroups, or None.

    Looks at cgroup v1's ``pids`` hierarchy, then at cgroup v2, at this process's own
    cgroup in each; it is usable if a child cgroup can be made there and has
    ``pids.max``. The probe cgroup is removed again. ``DISPYNB_PIDS_CGROUP=off`` in
    the node's environment opts out (max_pids is then enforced by counting).
    """
    if os.environ.get(NO_CGROUP_ENV, "").lower() in ("off", "0", "no"):
        return None
    try:
        with open("/proc/self/cgroup") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    mounts = _cgroup_mounts()
    candidates = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "pids" in controllers.split(","):
            mount = mounts.get("pids")
            if mount:
                candidates.append(mount + path)
        elif hierarchy == "0" and controllers == "":
            mount = mounts.get("")
            if mount:
                candidates.append(mount + path)
    for base in candidates:
        probe = os.path.join(base, f"dispynb-probe-{os.getpid()}")
        try:
            os.mkdir(probe)
        except OSError:
            continue
        try:
            if os.path.exists(os.path.join(probe, "pids.max")):
                return base
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(probe)
    return None


def node_pids_root() -> str | None:
    """`find_pids_root` for a node server: probed once per process (stale worker
    cgroups of dead computation processes are swept then), the opt-out
    (``DISPYNB_PIDS_CGROUP=off``) read every time."""
    if os.environ.get(NO_CGROUP_ENV, "").lower() in ("off", "0", "no"):
        return None
    with _PROBE_LOCK:  # one probe, also with `probe_in_background`'s thread
        return _probed_root()


def probe_in_background() -> None:
    """Probe `node_pids_root` now, on a thread: the probe (a cgroup made and
    removed, some 20-40 ms of waiting on cgroup v1) is then done before a client's
    first computation needs it, instead of on the way to its first job."""
    if os.environ.get(NO_CGROUP_ENV, "").lower() in ("off", "0", "no"):
        return
    threading.Thread(target=node_pids_root, name="pids-probe", daemon=True).start()


_PROBE_LOCK = threading.Lock()


@functools.cache
def _probed_root() -> str | None:
    root = find_pids_root()
    if root is not None:
        sweep_stale_cgroups(root)
    return root


def _cgroup_mounts() -> dict[str, str]:
    """Mount points: ``"pids"`` for v1's pids hierarchy, ``""`` for cgroup v2."""
    mounts: dict[str, str] = {}
    try:
        with open("/proc/self/mounts") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) < 4:
                    continue
                point, kind, options = fields[1], fields[2], fields[3].split(",")
                if kind == "cgroup" and "pids" in options:
                    mounts.setdefault("pids", point)
                elif kind == "cgroup2":
                    mounts.setdefault("", point)
    except OSError:
        pass
    return mounts


#: Worker cgroups: ``dispynb-<computation pid>-w<worker pid>``, and the one a
#: computation process is placed in at its start, ``dispynb-<its pid>-first``.
_WORKER_CGROUP = re.compile(r"dispynb-(\d+)-(?:w\d+|first)")


def sweep_stale_cgroups(root: str) -> int:
    """Remove the empty worker cgroups of computation processes that are gone
    (killed before they could clean up); how many were removed."""
    removed = 0
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    for name in names:
        match = _WORKER_CGROUP.fullmatch(name)
        if match is None or os.path.exists(f"/proc/{match[1]}"):
            continue
        with contextlib.suppress(OSError):  # busy (tasks left) or gone: leave it
            os.rmdir(os.path.join(root, name))
            removed += 1
    return removed


def join_new_cgroup(
    root: str, name: str, max_pids: int, pid: int | None = None
) -> str | None:
    """Create cgroup ``root/name`` with ``pids.max``, move process ``pid`` (default:
    this one) into it.

    Returns its path, or None (logged) if that failed: the job then runs without a
    pids limit rather than not at all.
    """
    path = os.path.join(root, name)
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError as exc:
        logger.warning("no pids limit for this worker: %s", exc)
        return None
    try:
        set_pids_max(path, max_pids)
        move_to_cgroup(path, os.getpid() if pid is None else pid)
    except OSError as exc:
        # ESRCH: the process ended before the move (a computation closed as it
        # started: %dispy local's probes'), nothing to contain; a warning went to
        # the node's stderr, a %dispy local node's into the notebook's cell.
        log = logger.debug if exc.errno == errno.ESRCH else logger.warning
        log("no pids limit for this worker: %s", exc)
        with contextlib.suppress(OSError):
            os.rmdir(path)
        return None
    return path


def place_in_new_cgroup(root: str, pid: int, max_pids: int) -> str | None:
    """Move a new computation process ``pid`` into cgroup ``dispynb-<pid>-first``.

    Run by the node server (in a thread: the write may wait for a grace period)
    while the process is still starting. Its first worker is forked inside this
    cgroup and keeps it, so that worker starts contained without a move of its own.
    ``pids.max`` is one more than ``max_pids`` because the computation process is
    counted too until it has moved back out (`nodeserver.compute` then sets
    ``max_pids``). Returns the path, or None if that failed (logged).
    """
    return join_new_cgroup(root, f"dispynb-{pid}-first", max_pids + 1, pid)


def set_pids_max(path: str, max_pids: int) -> None:
    """Set ``pids.max`` of cgroup ``path`` (raises OSError)."""
    with open(os.path.join(path, "pids.max"), "w") as handle:
        handle.write(str(max_pids))


def move_to_cgroup(path: str, pid: int) -> None:
    """Move process ``pid`` (all its threads) into cgroup ``path`` (raises OSError)."""
    with open(os.path.join(path, "cgroup.procs"), "w") as handle:
        handle.write(str(pid))


def cgroup_pids(path: str) -> list[int]:
    """The processes in cgroup ``path`` (empty if it is gone)."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as handle:
            return [int(pid) for pid in handle.read().split()]
    except OSError:
        return []


def remove_cgroup(path: str) -> bool:
    """Kill what is left in cgroup ``path`` and remove it; False if it stays busy."""
    deadline = time.monotonic() + _CGROUP_EMPTY_WAIT
    while True:
        for pid in cgroup_pids(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)  # killed tasks take a moment to leave the cgroup
