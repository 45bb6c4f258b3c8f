"""How a `Computation` starts its process and signals its workers: the `Launcher`.

Each computation runs in its own process, whose workers are processes forked from
it (design decision 5). ``dispynb-node`` forks computation processes from its
zygote (`nodeserver.zygote.ZygoteLauncher`); `ProcessLauncher` starts them as
``python -m nodeserver.compute`` instead (no zygote, or it died). A launcher is
the one place where the node's asynchronous side (`nodeserver.computation`) touches
processes, so tests of that side can supply an in-process stand-in that speaks
the same control and worker channels (`nodeserver.ipc`) without starting a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Protocol

import nodeserver
from nodeserver import containment
from nodeserver.containment import HeldWorker, deaf_to

logger = logging.getLogger(__name__)


class ComputationProcess(Protocol):
    """A started computation process, as `Computation` waits for and ends it."""

    #: Its process id (its first cgroup is made for it: `containment`).
    pid: int

    async def wait(self) -> int:
        """Wait for the process to exit; its exit status."""
        ...

    def kill(self) -> None:
        """End the process now (its workers die with it)."""
        ...


class Launcher(Protocol):
    """Starts computation processes and signals their workers."""

    async def start(
        self, control: socket.socket, cwd: str, timeout: float | None = None
    ) -> ComputationProcess:
        """Start a computation process in directory ``cwd``, talking over ``control``.

        ``control`` is the process's end of the control socket pair; the launcher
        owns it from now on (the caller keeps the other end). ``timeout``: the
        seconds the computation's setup may take (``setup_timeout``), if bounded.
        Raises `SetupError` if the process cannot be had.
        """
        ...

    def interrupt(self, worker: HeldWorker) -> bool:
        """Interrupt the job running in ``worker`` (SIGINT: KeyboardInterrupt);
        False if its job cannot get it (it ignores or blocks SIGINT)."""
        ...

    def kill_group(self, worker: HeldWorker) -> None:
        """Kill ``worker`` and every process of its group (SIGKILL)."""
        ...

    def sweep_orphans(self) -> int:
        """Kill what a dead worker or computation process left to the node (how
        many): called when one of them has died."""
        ...


class ProcessLauncher:
    """The node server's launcher: ``python -P -m nodeserver.compute --control-fd N``.

    ``log_level`` (a level name, as ``dispynb-node --loglevel``): the computation
    processes log to stderr at it, in the node's format; None leaves their logging
    unconfigured (an in-process node server: its program decides).
    """

    def __init__(self, log_level: str | None = None) -> None:
        self.log_level = log_level

    async def start(
        self, control: socket.socket, cwd: str, timeout: float | None = None
    ) -> ComputationProcess:
        """Start the process with the control socket passed as fd ``N`` (at once:
        nothing to wait for, ``timeout`` is not needed)."""
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(nodeserver.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, env.get("PYTHONPATH", "")) if p
        )
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                # Not the computation's directory first on the path (``-m``
                # would): a user's ``msgpack.py`` sent there would be imported
                # for ours; `nodeserver.compute` adds it once its own are in.
                "-P",
                "-m",
                "nodeserver.compute",
                "--control-fd",
                str(control.fileno()),
                "--node-pid",
                str(os.getpid()),
                *compute_log_option(self.log_level),
                pass_fds=(control.fileno(),),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            control.close()  # the process has its own copy

    def interrupt(self, worker: HeldWorker) -> bool:
        """SIGINT to the worker; it may have ended already. False if the worker
        ignores or blocks SIGINT (its job made it so: ``signal.signal(SIGINT,
        SIG_IGN)``, a library that masks signals): nothing will interrupt it.

        The masks are read before the signal: while the kernel hands it to
        Python's handler, SIGINT shows blocked, and a job about to get its
        KeyboardInterrupt would be taken for deaf (and killed)."""
        deaf = deaf_to(worker.pid, signal.SIGINT)
        worker.signal(signal.SIGINT)
        return not deaf

    def kill_group(self, worker: HeldWorker) -> None:
        """SIGKILL to the worker's process group (a worker leads its own group) and
        to all its descendants, those that left the group too; nothing once it
        has exited (`HeldWorker.kill_tree`)."""
        worker.kill_tree()

    def sweep_orphans(self) -> int:
        """Nothing: this process is no subreaper (`AdoptingLauncher` is)."""
        return 0


def compute_log_option(log_level: str | None) -> list[str]:
    """The option that has a computation process log at ``log_level``."""
    return [] if log_level is None else ["--loglevel", log_level]


#: The launcher in-process node servers use unless told otherwise.
PROCESS_LAUNCHER = ProcessLauncher()


class AdoptingLauncher(ProcessLauncher):
    """New interpreters, started by a node server that is a child subreaper.

    What a dead worker or computation process leaves running (a ``setsid()``
    daemon, what a killed setup started) comes back to the node instead of init:
    `sweep_orphans` kills it and `reap_adopted` reaps it (on SIGCHLD, once
    `watch` ran on the node's loop). ``dispynb-node`` uses it without a zygote
    (``DISPYNB_ZYGOTE=0``, not Linux) and, through `ZygoteLauncher`, once its
    zygote is gone. ``adopting`` False (no ``PR_SET_CHILD_SUBREAPER`` here): it
    is a plain `ProcessLauncher`.
    """

    def __init__(self, adopting: bool = False, log_level: str | None = None) -> None:
        super().__init__(log_level)
        self.adopting = adopting
        self._watching = False  # the SIGCHLD handler is installed
        #: New interpreters started, reaped by asyncio's child watcher.
        self._own: set[int] = set()
        self._launching = 0  # new interpreters being started: their pids not known
        #: A sweep or reap was put off while a process was being made: done as
        #: soon as none is (`_launched`).
        self._put_off = False
        self._waits: set[asyncio.Future[int]] = set()

    async def start(
        self, control: socket.socket, cwd: str, timeout: float | None = None
    ) -> ComputationProcess:
        """`ProcessLauncher.start`, the process known to `reap_adopted`."""
        self._watch_orphans()
        return await self._start_interpreter(control, cwd)

    async def _start_interpreter(
        self, control: socket.socket, cwd: str
    ) -> ComputationProcess:
        """A new interpreter, known to `reap_adopted` as one asyncio's child
        watcher reaps, from its start to its end."""
        self._launching += 1
        try:
            process = await super().start(control, cwd)
        except BaseException:
            self._launching -= 1
            self._launched()
            raise
        self._launching -= 1
        pid = process.pid
        self._own.add(pid)
        waited = asyncio.ensure_future(process.wait())
        self._waits.add(waited)

        def forget(_: object) -> None:
            self._waits.discard(waited)
            self._own.discard(pid)

        waited.add_done_callback(forget)
        self._launched()
        return process

    def watch(self) -> None:
        """On the node's running loop: reap adopted processes as they exit."""
        self._watch_orphans()

    def _watch_orphans(self) -> None:
        """Reap adopted processes as they exit (SIGCHLD on the node's loop)."""
        if self.adopting and not self._watching:
            self._watching = True
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGCHLD, self.reap_adopted)

    def _reaped_elsewhere(self) -> set[int]:
        """The node's children that others reap (asyncio's child watcher)."""
        return set(self._own)

    def _known(self) -> set[int]:
        """The node's children that are computation processes: no orphans."""
        return set(self._own)

    def _busy(self) -> bool:
        """A process is being made whose pid may not be known yet."""
        return self._launching > 0

    def _launched(self) -> None:
        """A process was made (or could not be): what was put off meanwhile (an
        orphan adopted during the launch, a child that exited), now, unless
        another is being made (then at its end)."""
        if self._put_off and not self._busy():
            self.reap_adopted()

    def _forget(self, pid: int) -> None:
        """Child ``pid`` was reaped by `reap_adopted`."""

    def reap_adopted(self) -> int:
        """Reap the node's exited children other than those asyncio's watcher
        follows: the processes it adopted; how many. Each is looked at by pid
        (a ``waitpid(-1)`` would take the others' exit statuses)."""
        if self._busy():
            self._put_off = True  # a new process's pid is not known yet
            return 0
        reaped = 0
        elsewhere = self._reaped_elsewhere()
        for pid in containment.children(os.getpid()):
            if pid in elsewhere or not zombie(pid):
                continue
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped += 1
                    self._forget(pid)
        self.sweep_orphans()  # an orphan's own children come here once it is gone
        return reaped

    def sweep_orphans(self) -> int:
        """Kill the node's children that are no computation process: what a dead
        worker or computation process left to the node, their subreaper (a job's
        ``setsid()`` daemon whose worker died abruptly, where no pids cgroup
        holds it; what a dead computation's setup started). How many."""
        if not self.adopting:
            return 0
        if self._busy():
            # A process being made may not be known yet: swept once it is
            # (`_launched`), not at the next death, which may be long in coming.
            self._put_off = True
            return 0
        self._put_off = False
        known = self._known()
        killed = 0
        for pid in containment.children(os.getpid()):
            if pid in known or zombie(pid):
                continue
            # Not reaped: its pid cannot have been reused.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        if killed:
            logger.info(
                "killed %d process(es) left by dead workers or computations", killed
            )
        return killed

    def stop(self) -> None:
        """Before the node exits: reap what ended after its loop did."""
        if self.adopting:
            self.reap_adopted()


def process_state(pid: int) -> bytes:
    """Process ``pid``'s state letter in proc(5) (b"Z": a zombie, exited and not
    reaped; b"T": stopped by a signal), or b"" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return b""
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]


def zombie(pid: int) -> bool:
    """Whether process ``pid`` is a zombie (exited, not reaped)."""
    return process_state(pid) == b"Z"
