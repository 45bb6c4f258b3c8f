"""The computation process: loads a computation, runs its setup, forks its workers.

The node server starts one per computation (design decision 5): forked from its
zygote (`nodeserver.zygote`), which then calls `main`, or as::

    python -m nodeserver.compute --control-fd N

with ``N`` one end of a Unix socket pair (passed with ``pass_fds``) and the
computation's directory as the working directory. Over that control channel
(messages of `nodeserver.ipc`):

1. it receives `Load`, unpickles the bundle and runs ``setup(*setup_args)``; on failure
   it sends `LoadFailed` and exits 1;
2. it sends `Loaded`, then forks ``workers`` worker processes, sending `WorkerStarted`
   for each with the node server's end of that worker's socket and a pidfd of the
   worker (SCM_RIGHTS);
3. it reports every worker's death with `WorkerExited` and forks a replacement
   (another `WorkerStarted`), until `Shutdown` (or SIGTERM/SIGINT): then it stops the
   workers (SIGTERM, SIGKILL after `STOP_GRACE` seconds), reports them, runs
   ``cleanup(*setup_args)`` and exits 0. At EOF of the control channel, or when the
   node server dies (also while setup or cleanup runs, whatever signal handlers
   they install: see `containment.NodeWatch`), it kills the workers and every
   process it or its setup started, and exits 1.

Workers are forked after setup, so whatever setup put in the computation's globals
(large data, ``multiprocessing`` shared values) is visible to jobs. A worker runs
`nodeserver.jobrunner.worker_loop` and dies with this process (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import select
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any, NoReturn

from dispynb.daemon import load_prctl, setup_package_logging
from dispynb.errors import ConnectionClosedError
from dispynb.protocol import shm
from dispynb.protocol.records import ComputationBundle
from nodeserver.channel import MessageSocket
from nodeserver.containment import (
    NodeGone,
    NodeWatch,
    become_group_leader,
    deaf_to,
    descendants,
    end_leftovers,
    find_pids_root,
    join_new_cgroup,
    kill_group,
    kill_pinned,
    open_pidfd,
    pin,
    remove_cgroup,
    set_pids_max,
)
from nodeserver.ipc import (
    IpcMessage,
    Load,
    Loaded,
    LoadFailed,
    Shutdown,
    WorkerExited,
    WorkerStarted,
)
from nodeserver.jobapi import CONTEXT
from nodeserver.jobreasons import crash_reason, oom_kills, oom_note
from nodeserver.jobrunner import worker_loop
from nodeserver.loading import LoadFailure, leave_cgroup, load_computation, receive_load
from nodeserver.loading import dispy_names as dispy_names  # as before the split
from nodeserver.memory import keep_freed_memory
from nodeserver.strays import Strays

# Named, not __name__: run as ``python -m nodeserver.compute`` it is "__main__".
logger = logging.getLogger("nodeserver.compute")

#: Seconds workers get to exit after SIGTERM at shutdown, before SIGKILL.
STOP_GRACE = 2.0

#: Seconds between counts of each worker's processes, where no pids cgroup can
#: enforce max_pids, and between looks for processes a job made outside its
#: worker (`nodeserver.strays`).
COUNT_INTERVAL = 0.5

_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Held while a worker is forked, reset in it.
_HANDLED_SIGNALS = (signal.SIGCHLD, *_STOP_SIGNALS)
_WAKING_SIGNALS = (signal.SIGCHLD, *_STOP_SIGNALS)


class ComputationProcess:
    """The computation process's side of a computation (the node server's side is
    `nodeserver.computation.Computation`): its functions, and the workers forked to
    run it.

    Parameters
    ----------
    control:
        The control channel to the node server.
    load:
        The `Load` message that described the computation.
    bundle:
        The unpickled `ComputationBundle`, checked (its ``func`` is callable).
    """

    def __init__(
        self, control: MessageSocket, load: Load, bundle: ComputationBundle
    ) -> None:
        self.control = control
        self.name = load.name
        self.size = load.workers
        func = bundle["func"]
        assert func is not None  # load_computation checked it
        self.func: Callable[..., Any] = func
        self.cleanup: Any = bundle.get("cleanup")
        self.setup_args: tuple[Any, ...] = tuple(bundle.get("setup_args") or ())
        self.workers: set[int] = set()
        self.stopping = False
        self._pid = os.getpid()
        self._fresh = load.fresh_process
        self._max_pids = load.max_pids
        # A pids cgroup per worker where the system lets us make one (the node
        # server found the root once; a process started otherwise looks itself).
        root = find_pids_root() if load.pids_root is None else load.pids_root
        self._pids_root = (root or None) if load.max_pids else None
        # The cgroup this process was moved into at its start: the first worker is
        # forked in it and keeps it (`_start_worker`).
        self.first_cgroup = load.first_cgroup if self._pids_root else None
        # Without one, the processes under each worker are counted every
        # COUNT_INTERVAL seconds and a worker over the limit is killed.
        self._count_pids = bool(load.max_pids) and self._pids_root is None
        if self._count_pids:
            logger.info(
                "computation %r: no pids cgroup can be created here; max_pids is "
                "enforced by counting each worker's processes every %g s",
                self.name,
                COUNT_INTERVAL,
            )
        self._cgroups: dict[int, str] = {}
        self._kill_reasons: dict[int, str] = {}
        #: Out-of-memory kills the kernel had made when each worker started.
        self._oom_kills: dict[int, int | None] = {}
        self._oom_explained = 0  # the OOM kills that workers' deaths were put down to
        self._prctl = load_prctl()
        self._wake_r = self._wake_w = -1
        self._selector = selectors.DefaultSelector()
        self._node: NodeWatch | None = None
        self._strays: Strays | None = None

    def serve(self, node: NodeWatch | None = None) -> int:
        """Announce `Loaded`, start the workers and supervise them; the exit code.

        Raises `NodeGone` once ``node`` (the node server) has died, or
        `ConnectionClosedError` at the end of the control channel: the workers
        have been killed then.
        """
        self._node = node
        self._install_signals()
        try:
            self.control.send(Loaded(pid=self._pid))
            gc.freeze()  # keep setup's objects out of collections: pages stay shared
            # Setup's children are noted before the first worker: any other child
            # that is not a worker is a job's, made outside its worker.
            self._strays = Strays(self._pid, self.name)
            # With fresh_process, as many spare workers wait, forked ahead: a job
            # need not wait for the fork of a new process (the node runs at most
            # `size` at once).
            for _ in range(self.size * 2 if self._fresh else self.size):
                self._start_worker()
            return self._loop()
        finally:
            self._kill_workers()  # never leave orphans, whatever happened
            self._end_strays()

    def _loop(self) -> int:
        self._selector.register(self.control.fileno(), selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        if self._node is not None and self._node.fd is not None:
            self._selector.register(self._node.fd, selectors.EVENT_READ)
        while True:
            # A message read ahead with an earlier one never wakes the selector.
            while self.control.buffered:
                if self._is_shutdown(self.control.recv()[0]):
                    return self._shutdown()
            for key, _ in self._selector.select(COUNT_INTERVAL) or self._count_all():
                if key.fd == self._wake_r:
                    signals = self._drain_wakeups()
                    if any(signum in signals for signum in _STOP_SIGNALS):
                        return self._shutdown()
                    self._reap()
                    continue
                if self._node is not None and key.fd == self._node.fd:
                    raise NodeGone
                if self._is_shutdown(self.control.recv()[0]):
                    return self._shutdown()

    def _count_all(self) -> list[tuple[Any, int]]:
        """End the processes jobs made outside their workers; kill each worker
        whose job has more than max_pids processes (the count fallback of a pids
        cgroup); nothing to dispatch."""
        self._end_strays()
        if not self._count_pids:
            return []
        limit = self._max_pids or 0
        for pid in list(self.workers):
            if pid in self._kill_reasons:
                continue
            count = len(descendants(pid)) + 1
            if count > limit:
                self._kill_reasons[pid] = (
                    f"the job had {count} processes, over its max_pids of {limit}: "
                    "it and all its processes were killed"
                )
                kill_group(pid, None)
        return []

    @staticmethod
    def _is_shutdown(message: IpcMessage) -> bool:
        if isinstance(message, Shutdown):
            return True
        logger.warning("computation process ignores %r message", message.op)
        return False

    def _shutdown(self) -> int:
        self.stopping = True
        self._stop_workers()
        if callable(self.cleanup):
            CONTEXT.begin(self.control, 0, 0)  # for dispynode_shutdown() in cleanup
            guard = self._node.guard() if self._node else contextlib.nullcontext()
            try:
                with guard:
                    self.cleanup(*self.setup_args)
            except BaseException:  # user code: report it and still exit cleanly
                # With no logging configured this prints the traceback to stderr.
                logger.error(
                    "cleanup of computation %r failed", self.name, exc_info=True
                )
        return 0

    # --- workers -----------------------------------------------------------------

    def _start_worker(self) -> None:
        server_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (server_end, worker_end):
            _enlarge_buffers(end)
        _flush_std()  # or the child would write our buffered output a second time
        # Until the child has reset its handlers, a signal sent to it would write to
        # our wake-up pipe (and a SIGTERM to a new worker would stop us): hold them.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
        inherited = self.first_cgroup
        pid = os.fork()
        if pid == 0:
            self._become_worker(server_end, worker_end, mask, inherited is None)
        # Also here, so that the group exists before anyone signals it (no race).
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        worker_end.close()
        self.workers.add(pid)
        self._oom_kills[pid] = oom_kills()
        if inherited is not None:
            self._cgroups[pid] = inherited
        elif self._pids_root is not None:
            self._cgroups[pid] = self._cgroup_path(pid)
        # Opened before the worker can be reaped: the node signals it through this
        # (`containment.HeldWorker`), never by a pid that may be reused.
        pid_fd = open_pidfd(pid)
        fds = [server_end.fileno()] if pid_fd is None else [server_end.fileno(), pid_fd]
        try:
            self.control.send(WorkerStarted(pid=pid, pidfd=pid_fd is not None), fds=fds)
        finally:
            server_end.close()
            if pid_fd is not None:
                os.close(pid_fd)
        if inherited is not None:
            # The worker already runs in that cgroup: this process leaves it (while
            # the worker takes its first job), and it becomes the worker's alone.
            self._leave_first_cgroup(pid)

    def _leave_first_cgroup(self, worker: int) -> None:
        """Move out of the cgroup ``worker`` was forked in; it becomes the worker's."""
        path, self.first_cgroup = self.first_cgroup, None
        assert path is not None and self._pids_root is not None
        if not leave_cgroup(path, self._pids_root, remove=False):
            # Staying in it would put us under the worker's limit and in its kill:
            # the worker goes without (its process group still ends with it).
            self._cgroups.pop(worker, None)
            return
        try:  # we no longer count: the worker gets max_pids exactly
            set_pids_max(path, self._max_pids or 0)
        except OSError as exc:
            logger.warning("no pids limit for worker %d: %s", worker, exc)

    def _become_worker(
        self,
        server_end: socket.socket,
        worker_end: socket.socket,
        mask: set[int | signal.Signals],
        join_cgroup: bool,
    ) -> NoReturn:
        """Run in the forked child: shed the parent's resources, then serve jobs
        (``join_cgroup``: in a pids cgroup of its own, unless forked in one)."""
        code = 1
        try:
            server_end.close()
            signal.set_wakeup_fd(-1)
            for signum in _HANDLED_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self.control.close()
            if self._node is not None:
                self._node.close()
            if self._prctl is not None:
                self._prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != self._pid:  # the parent died before prctl
                os._exit(1)
            become_group_leader()
            if join_cgroup and self._pids_root is not None and self._max_pids:
                join_new_cgroup(
                    self._pids_root,
                    os.path.basename(self._cgroup_path(os.getpid())),
                    self._max_pids,
                )
            code = worker_loop(
                MessageSocket(worker_end, fds=True), self.func, once=self._fresh
            )
        except Exception:
            traceback.print_exc()
        finally:
            _flush_std()
            os._exit(code)

    def _cgroup_path(self, pid: int) -> str:
        assert self._pids_root is not None
        return os.path.join(self._pids_root, f"dispynb-{self._pid}-w{pid}")

    def _reap(self, *, block: bool = False) -> None:
        """Collect dead workers, report them, replace them unless stopping.

        A dead worker's group and cgroup are killed while it is still a zombie
        (``WNOWAIT``), so its number cannot be reused by then: whatever its job
        started ends with it.
        """
        flags = os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG)
        for pid in list(self.workers):
            # Only our workers: waitpid(-1) would steal children that setup started
            # (subprocess, multiprocessing) from the code that waits for them.
            peak = 0  # bytes of the worker's peak resident memory
            try:
                if os.waitid(os.P_PID, pid, flags) is None:
                    continue
                kill_group(pid, self._cgroups.get(pid))
                _, status, usage = os.wait4(pid, 0)
                peak = usage.ru_maxrss * 1024  # KiB on Linux
            except ChildProcessError:
                status = 0
            self.workers.discard(pid)
            if self._strays is not None:
                self._strays.worker_ended(pid)
            if status and CONTEXT.job_path:
                # Killed writing a result into shared memory (the OOM killer, as
                # those pages count against it): nobody else knows of that object.
                shm.unlink_partial_result(shm.result_prefix(CONTEXT.job_path), pid)
            cgroup = self._cgroups.pop(pid, None)
            if cgroup is not None and not remove_cgroup(cgroup):
                logger.warning("cgroup %s of a dead worker stays busy", cgroup)
            code = os.waitstatus_to_exitcode(status)
            reason = self._kill_reasons.pop(pid, "")
            ooms = self._oom_kills.pop(pid, None)
            if not reason and code == -signal.SIGKILL and ooms is not None:
                # Not killed by us: the OOM killer, if it killed something since the
                # worker started that no other worker's death was put down to (the
                # kernel does not say whom; a SIGKILL is all the worker gets).
                now = oom_kills()
                if now is not None and now > max(ooms, self._oom_explained):
                    reason = crash_reason(code) + oom_note(peak)
                    self._oom_explained = max(ooms, self._oom_explained) + 1
            self.control.send(WorkerExited(pid=pid, returncode=code, reason=reason))
            if not self.stopping:
                self._start_worker()
        self._end_strays()  # a SIGCHLD may be a stray's: it is reaped too

    def _end_strays(self) -> None:
        """End what jobs started outside their workers (`nodeserver.strays`)."""
        if self._strays is not None:
            self._strays.end(self.workers)

    def _stop_workers(self) -> None:
        """SIGTERM the workers' groups, SIGKILL them after `STOP_GRACE` (at once
        those that ignore or block SIGTERM); reap all.

        What the jobs started that left their worker's group (``setsid``, then
        adopted by the worker) is found now, while the workers live: a worker
        that ends at the SIGTERM hands those to init, beyond any later kill.
        """
        detached = pin([pid for w in self.workers for pid in descendants(w)])
        # Its job ignores SIGTERM (and left it so, idle): waiting for it only
        # keeps the client's close waiting, `STOP_GRACE` for nothing. Read before
        # the signal: while a handler of the job's is handed it, it shows blocked.
        deaf = [pid for pid in self.workers if deaf_to(pid, signal.SIGTERM)]
        _signal_groups(self.workers, signal.SIGTERM)
        for pid in deaf:
            kill_group(pid, self._cgroups.get(pid))
        deadline = time.monotonic() + STOP_GRACE
        waiter = select.poll()
        waiter.register(self._wake_r, select.POLLIN)
        while True:
            self._reap()
            remaining = deadline - time.monotonic()
            if not self.workers or remaining <= 0:
                break
            if waiter.poll(remaining * 1000):
                self._drain_wakeups()
        self._kill_trees()
        self._reap(block=True)
        kill_pinned(detached)

    def _kill_workers(self) -> None:
        """SIGKILL and reap every worker; report them if the node server listens."""
        if not self.workers:
            return
        self.stopping = True
        self._kill_trees()
        try:
            self._reap(block=True)
        except ConnectionClosedError:  # the node died: nobody to report them to
            for pid in list(self.workers):
                kill_group(pid, self._cgroups.get(pid))
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                if CONTEXT.job_path:
                    # What it was writing of a result (as `_reap` does): left,
                    # it held its bytes of the machine's memory until a reboot.
                    shm.unlink_partial_result(shm.result_prefix(CONTEXT.job_path), pid)
            self.workers.clear()
        for cgroup in self._cgroups.values():
            remove_cgroup(cgroup)
        self._cgroups.clear()

    def _kill_trees(self) -> None:
        """SIGKILL every worker with all its processes (`containment.kill_group`)."""
        for pid in self.workers:
            kill_group(pid, self._cgroups.get(pid))

    # --- signals -------------------------------------------------------------------

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        for signum in _WAKING_SIGNALS:
            signal.signal(signum, _wake)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _drain_wakeups(self) -> bytes:
        """Empty the wake-up pipe; the signal numbers received."""
        data = b""
        while True:
            try:
                chunk = os.read(self._wake_r, 256)
            except BlockingIOError:
                return data
            if not chunk:
                return data
            data += chunk


# --- helpers -------------------------------------------------------------------------


def _wake(signum: int, frame: FrameType | None) -> None:
    """No-op handler: `signal.set_wakeup_fd` wakes the selector."""


def _signal_groups(pids: Iterable[int], signum: int) -> None:
    """Signal each worker's process group (the worker and what its job started)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed by the user's code: nothing to lose
            pass


#: Socket buffer size asked for worker channels: large arguments then flow while
#: the worker is still busy with its previous job (the kernel caps it at wmem_max).
WORKER_SOCKET_BUFFER = 4 * 1024 * 1024


def _enlarge_buffers(sock: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, WORKER_SOCKET_BUFFER)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m nodeserver.compute``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m nodeserver.compute",
        description="A dispynb computation process (started by the node server).",
    )
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument(
        "--node-pid", type=int, help="the node server (default: the parent)"
    )
    parser.add_argument(
        "--parent-pid", type=int, help="the zygote that forked this process, if any"
    )
    parser.add_argument(
        "--loglevel", help="log to stderr at this level, as the node does"
    )
    args = parser.parse_args(argv)
    leave_the_terminal()
    if args.loglevel is not None:
        # The node's own loggers only: the workers forked from here run jobs,
        # which set up logging of their own (into their own output).
        setup_package_logging("nodeserver", args.loglevel)
    node = NodeWatch(args.node_pid or os.getppid(), args.parent_pid)
    if not node.lives():
        return 1
    keep_freed_memory()  # before any large message; workers inherit it
    control = MessageSocket(socket.socket(fileno=args.control_fd))
    try:
        try:
            load = receive_load(control)
            if control.buffered:  # its Shutdown came with Load: closed at once
                return 0
            # The user's setup runs: the node is watched, and anything it sends
            # (Shutdown) or its hang-up closes the computation during the setup.
            with node.guard(stop=control.fileno()):
                computation = ComputationProcess(control, *load_computation(*load))
        except LoadFailure as failure:
            control.send(
                LoadFailed(message=failure.message, traceback=failure.traceback)
            )
            return 1
        return computation.serve(node)
    except (ConnectionClosedError, NodeGone):
        # Nobody will ask for cleanup: what setup started must not outlive us.
        # Not a warning: the node's death is its clients' to report (a notebook's
        # cell says which node left), and this process shares the node's stderr,
        # which a %dispy local node shares with the kernel: the line came into the
        # running cell once per computation, bare, after the client's own.
        logger.info("computation process: node server gone; stopping")
        end_leftovers()
        return 1
    finally:
        control.close()
        node.close()


def leave_the_terminal() -> None:
    """Lead a session of its own, with no controlling terminal (as a daemon does),
    before setup runs: its workers are forked into it.

    A node run in a terminal (the README's ``dispynb-node``) shared its process
    group with this process: Ctrl-C there sent SIGINT to both, and this process
    stopped its workers while the node drained, so its running jobs were killed,
    not let finish; Ctrl-Z stopped it, and closing the terminal hung it up. And a
    job that read the terminal (``getpass``, an ``ssh`` or ``sudo`` asking) had its
    worker, in the terminal's session but not its foreground, stopped by SIGTTIN:
    it hung for ever. Now the terminal's signals reach the node alone, which
    stops as it says, and such a job fails: ``/dev/tty`` cannot be opened. A node
    killed whole (its cgroup, by a batch system or systemd) still takes this
    process with it, as ever (`containment.NodeWatch`)."""
    with contextlib.suppress(OSError):  # leads a group already: never, as started
        os.setsid()


def lead_path(directory: str) -> None:
    """Put the computation's ``directory`` first on ``sys.path``, so the modules its
    client sent (``depends``) import: in place of the node's start directory (which
    ``python -m`` or a script put first), or before every entry where the
    interpreter put none (``-P``, as the launchers start nodes and `ProcessLauncher`
    this process: a user's ``dispynb.py`` or ``msgpack.py`` in that directory must
    not shadow the modules this process imports first)."""
    if sys.flags.safe_path:
        sys.path.insert(0, directory)
    else:
        sys.path[:1] = [directory]


if __name__ == "__main__":
    lead_path(os.getcwd())
    sys.exit(main())
