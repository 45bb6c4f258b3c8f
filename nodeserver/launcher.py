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
import os
import signal
import socket
import subprocess
import sys
from typing import Protocol

import nodeserver
from nodeserver import containment


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

    def interrupt(self, pid: int) -> None:
        """Interrupt the job running in worker ``pid`` (SIGINT: KeyboardInterrupt)."""
        ...

    def kill_group(self, pid: int) -> None:
        """Kill worker ``pid`` and every process of its group (SIGKILL)."""
        ...

    def sweep_orphans(self) -> int:
        """Kill what a dead worker or computation process left to the node (how
        many): called when one of them has died."""
        ...


class ProcessLauncher:
    """The node server's launcher: ``python -m nodeserver.compute --control-fd N``."""

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
                "-m",
                "nodeserver.compute",
                "--control-fd",
                str(control.fileno()),
                "--node-pid",
                str(os.getpid()),
                pass_fds=(control.fileno(),),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            control.close()  # the process has its own copy

    def interrupt(self, pid: int) -> None:
        """SIGINT to the worker; it may have ended already."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)

    def kill_group(self, pid: int) -> None:
        """SIGKILL to the worker's process group (a worker leads its own group) and
        to all its descendants, those that left the group too."""
        containment.kill_group(pid, None)

    def sweep_orphans(self) -> int:
        """Nothing: a node without a zygote is no subreaper; orphans go to init."""
        return 0


#: The launcher node servers use unless told otherwise.
PROCESS_LAUNCHER = ProcessLauncher()
