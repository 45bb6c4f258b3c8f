"""The node's console: commands typed on ``dispynb-node``'s standard input.

As dispynode without ``--daemon``: ``quit``/``exit`` stop the node, ``stop`` takes
no new clients (telling them why) until ``start``, ``cpus N``
changes the CPUs it serves, Enter (or ``status``) shows how it is. Answers go to
standard output; anything else gets the list of commands.

Standard input is read with the event loop's reader, never blocking it: a line at a
time, as it comes. At end of file (a launcher's ``/dev/null``, a closed pipe) the
node stops reading and goes on serving: dispynode exited there, so a node started
with nothing to read ended at once. A terminal the node is in the background of
(``dispynb-node &``) is not read: reading it would stop the node (``SIGTTIN``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from dispynb.wording import counted
from nodeserver.health import health_of

if TYPE_CHECKING:
    from nodeserver.server import NodeServer

logger = logging.getLogger(__name__)

#: What an unknown command (and ``help``) is answered with.
HELP = """commands:
  quit      stop the node now: its running jobs are terminated
  exit      stop the node as SIGTERM does: running jobs get --drain-timeout
  stop      take no new clients (connected ones go on)
  start     take new clients again
  cpus N    serve N CPUs (-N: all of this machine's but N)
  status    how the node is (or just Enter)
  help      this list"""

#: Longest line kept: a longer one is no command (and not kept in memory).
MAX_LINE = 4096


def wants_console(fd: int = 0) -> bool:
    """Whether ``fd`` is to be read for commands: anything open but a terminal the
    node is in the background of (a read there would stop the node)."""
    try:
        os.fstat(fd)
    except OSError:  # closed
        return False
    if not os.isatty(fd):
        return True
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False


class Console:
    """Reads commands from ``fd`` and does them on ``server``.

    ``stop`` is called with the command's words to stop the node: ``now`` True
    for ``quit`` (as a second signal: running jobs are terminated), False for
    ``exit`` (as the first: they get the drain timeout).
    """

    def __init__(
        self,
        server: NodeServer,
        stop: Callable[[str, bool], None],
        fd: int = 0,
        out: Callable[[str], None] | None = None,
    ) -> None:
        self.server = server
        self._stop = stop
        self._fd = fd
        self._out = out or _print
        self._pending = b""
        self._cpus_next = False  # "cpus" alone: the next line is the count
        self._stopping = False  # "quit" or "exit" was typed
        self._polled: asyncio.Handle | None = None
        self._reading = False
        # Lines are done one after the other, in the order typed ("start" then
        # "status" shows it started), by one task.
        self._lines: asyncio.Queue[bytes] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Read ``fd`` from now on, in the running loop."""
        loop = asyncio.get_running_loop()
        self._worker = loop.create_task(self._work())
        try:
            loop.add_reader(self._fd, self._readable)
            self._reading = True
        except PermissionError:
            # A regular file or /dev/null (epoll refuses them): their reads never
            # block, so they are read in turns with the loop's other work.
            self._polled = loop.call_soon(self._poll)
        if os.isatty(self._fd):
            self._out("type help (then Enter) for the node's commands")

    def close(self) -> None:
        """Stop reading and doing commands (the node stopped)."""
        self._stop_reading()
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None

    def _stop_reading(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._reading = False
        if self._polled is not None:
            self._polled.cancel()
            self._polled = None

    async def _work(self) -> None:
        while True:
            line = await self._lines.get()
            try:
                await self._line(line)
            except Exception:  # the console goes on: the next command may work
                logger.exception("the command %r failed", line.decode(errors="replace"))

    def _poll(self) -> None:
        self._polled = None
        if self._readable():
            self._polled = asyncio.get_running_loop().call_soon(self._poll)

    def _readable(self) -> bool:
        """Read what ``fd`` has and do its whole lines; False at its end."""
        try:
            data = os.read(self._fd, MAX_LINE)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:  # the lines read before are done all the same
            self._stop_reading()
            if self._pending:
                self._lines.put_nowait(self._pending)
            self._pending = b""
            return False
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        if len(self._pending) > MAX_LINE:
            self._pending = b""
            self._out(f"line too long: no command\n{HELP}")
        for line in lines:
            self._lines.put_nowait(line)
        return True

    async def _line(self, raw: bytes) -> None:
        words = raw.decode("utf-8", "replace").strip().lower().split()
        if self._cpus_next:
            self._cpus_next = False
            self._set_cpus(words)
            return
        command, args = (words[0], words[1:]) if words else ("status", [])
        if (self._stopping or self.server.draining) and command in (
            "stop",
            "start",
            "cpus",
            "exit",
        ):
            # Read on while it drains: "quit" then terminates what still runs.
            self._out(
                f"{command}: the node is stopping already; type quit to terminate "
                "its running jobs now"
            )
        elif command in ("quit", "exit"):
            self._out(
                "stopping: running jobs are terminated"
                if command == "quit"
                else "stopping: running jobs get the drain timeout (type quit to "
                "terminate them)"
            )
            self._stopping = True
            self._stop(command, command == "quit")
        elif command == "stop":
            self.server.hold(
                f"node {self.server.config.name!r} takes no new clients: stopped on "
                "its console (start there takes them again)"
            )
            self._out(
                "taking no new clients (type start to take them again); connected "
                "clients go on"
            )
        elif command == "start":
            await self._resume()
        elif command == "cpus":
            if args:
                self._set_cpus(args)
            else:
                self._cpus_next = True
                self._out("CPUs to serve (N, or -N for all but N):")
        elif command == "status" and not args:
            self._status()
        elif command == "release":  # dispynode's: close a dead client's computations
            self._out(
                "release: not needed here: the computations of a client silent for "
                "--orphan-timeout seconds are closed by the node itself"
            )
        elif command == "help":
            self._out(HELP)
        else:
            self._out(f"unknown command {' '.join(words)!r}\n{HELP}")

    async def _resume(self) -> None:
        server = self.server
        if server.held is not None:
            await server.unhold()
        elif server.listening:
            self._out("already taking new clients")
            return
        elif server.not_serving is None:
            try:
                await server.resume()  # closed by its service window
            except OSError as exc:
                self._out(f"cannot take clients again: {exc}")
                return
        if server.not_serving is not None:
            self._out(f"cannot start: {server.not_serving}")
        elif server.listening:
            self._out(f"taking new clients again on port {server.port}")
        else:
            self._out("taking new clients once its service window opens")

    def _set_cpus(self, words: list[str]) -> None:
        try:
            (asked,) = (int(word) for word in words)
        except ValueError:
            self._out(
                f"cpus needs one whole number, not {' '.join(words)!r}: N CPUs, or "
                "-N for all of this machine's but N"
            )
            return
        available = os.cpu_count() or 1
        cpus = asked if asked > 0 else available + asked
        if asked == 0 or cpus < 1:
            self._out(
                f"cpus {asked}: give 1 or more, or -N (all {available} but N, "
                f"N < {available}); type stop to take no new clients"
            )
            return
        self.server.set_cpus(cpus)
        self._out(
            f"serving {counted(cpus, 'CPU')}: up to {counted(cpus, 'job')} at once; "
            "clients that connect from now on are told"
        )

    def _status(self) -> None:
        server = self.server
        health = health_of(server)
        state = (
            "stopping"
            if health.draining
            else "taking new clients"
            if health.serving
            else server.not_serving
            or ("taking no new clients (type start)" if server.held else "")
            or "taking no new clients until its service window opens"
        )
        lines = [
            f"node {health.name!r}: {state}; {health.busy} of "
            f"{counted(health.cpus, 'CPU')} busy; "
            f"{counted(server.clients_served, 'client')} served so far",
        ]
        sessions = sorted(server.sessions, key=lambda s: s.session_id)
        lines.append(f"  {counted(len(sessions), 'client')} connected")
        for session in sessions:
            lines.append(
                f"    {session.client_name or 'client'} at {session.conn.peer}: "
                f"{counted(session.computation_count, 'computation')}"
            )
        self._out("\n".join(lines))


def _print(text: str) -> None:
    with contextlib.suppress(OSError):  # nobody reads the answers any more
        print(text, flush=True, file=sys.stdout)
