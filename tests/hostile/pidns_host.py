"""The first process of a pid namespace of a test's own: it starts a real node in
it and, on the test's word (lines on stdin, answers on stdout), pauses and resumes
that node, kills a process, and makes a process take a given pid.

Run as ``unshare -p -f --mount-proc python -m tests.hostile.pidns_host DIR SECRET``.
In a namespace of its own, pids are handed out in order from ``ns_last_pid``, which
its first process may set: a pid that was reused is arranged at once, without
forking round the whole pid space. Every pid on the wire is the namespace's.

Commands: ``stop`` / ``cont`` (SIGSTOP / SIGCONT the node), ``kill-worker PID``
(SIGKILL it, then wait until its parent reaped it and forked another worker),
``reuse PID`` (a process with that pid leading a group of its own, with a child
in the group; answers both pids), ``alive`` (whether those two still run), and
``exit``.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.nodeproc import start_node

#: Seconds a command may wait for what it waits for.
WAIT = 20.0


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            found.update(int(c) for c in handle.read().split())
    return found


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        stat = handle.read()
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def _wait(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {WAIT} s")
        time.sleep(0.01)


def kill_worker(pid: int) -> str:
    """SIGKILL worker ``pid``; once its computation process reaped it and forked
    its replacement, nothing else forks here while the node is paused."""
    parent = _parent(pid)
    before = _children(parent) - {pid}
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not os.path.exists(f"/proc/{pid}"), f"worker {pid} reaped")
    _wait(lambda: _children(parent) - before, f"worker {pid} replaced")
    return "ok"


def _group_with_a_child() -> None:
    """In the forked process: lead a session and group, with a child in it."""
    os.setsid()
    if os.fork() == 0:
        signal.pause()
        os._exit(0)
    signal.pause()
    os._exit(0)


class Host:
    """The namespace's first process: the node, and the processes made on request."""

    def __init__(self, directory: Path, secret: str) -> None:
        self.node = start_node(directory, secret=secret)
        self.held: list[int] = []  # pidfds of the processes `reuse` made

    def reuse(self, pid: int) -> str:
        """A new process with pid ``pid`` (free by now), leading its own group with
        a child; ``"<pid> <child>"``."""
        for _ in range(100):  # a fork elsewhere in the namespace may take it first
            with open("/proc/sys/kernel/ns_last_pid", "w") as handle:
                handle.write(str(pid - 1))
            child = os.fork()
            if child == 0:
                _group_with_a_child()
            if child == pid:
                break
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        else:
            raise RuntimeError(f"pid {pid} could not be had")
        _wait(lambda: _children(pid), f"process {pid}'s child forked")
        (grandchild,) = _children(pid)
        self.held = [os.pidfd_open(pid), os.pidfd_open(grandchild)]
        return f"{pid} {grandchild}"

    def alive(self) -> str:
        """``"1 1"`` while both processes `reuse` made run (0 for one that died)."""
        return " ".join(
            "0" if select.select([fd], [], [], 0)[0] else "1" for fd in self.held
        )

    def answer(self, command: str, args: list[str]) -> str:
        if command == "stop":
            self.node.proc.send_signal(signal.SIGSTOP)
            return "ok"
        if command == "cont":
            self.node.proc.send_signal(signal.SIGCONT)
            return "ok"
        if command == "kill-worker":
            return kill_worker(int(args[0]))
        if command == "reuse":
            return self.reuse(int(args[0]))
        if command == "alive":
            return self.alive()
        raise RuntimeError(f"unknown command {command!r}")

    def serve(self) -> None:
        print(f"port {self.node.port}", flush=True)
        for line in sys.stdin:
            command, *args = line.split()
            if command == "exit":
                break
            try:
                reply = self.answer(command, args)
            except Exception as exc:  # the test reads it and fails with it
                reply = f"error {exc}"
            print(reply, flush=True)
        self.node.proc.send_signal(signal.SIGCONT)
        self.node.stop()


if __name__ == "__main__":
    Host(Path(sys.argv[1]), sys.argv[2]).serve()
