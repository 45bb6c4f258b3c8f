"""A real IPython kernel started the way JupyterLab starts it (jupyter_client), for the
tests that must see what a person in a notebook sees: prompts, streams, errors, and
the kernel's process group (Stop is ``os.killpg(pgid, SIGINT)``)."""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
from jupyter_client.manager import KernelManager

ROOT = Path(__file__).resolve().parents[2]

#: Seconds a cell of a test may take (starting nodes included).
CELL_TIMEOUT = 60.0


@dataclasses.dataclass
class CellOutput:
    """What one executed cell showed: its prompt number, streams and error."""

    execution_count: int | None = None
    status: str = ""
    stdout: str = ""
    stderr: str = ""
    ename: str = ""
    evalue: str = ""
    traceback: list[str] = dataclasses.field(default_factory=list)
    data: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: What its displays were updated to (a progress bar's counts), in order.
    updates: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    idle_at: float = 0.0  # time.monotonic() when the kernel went idle
    pager: str = ""  # what the pager shows (``%%dispy?``)
    #: The streams' texts in the order the page shows them: (name, text).
    streams: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def error_text(self) -> str:
        """The error as the notebook prints it (ANSI colours removed)."""
        return strip_ansi("\n".join(self.traceback))

    @property
    def text(self) -> str:
        """Everything printed, as plain text: streams, results, error."""
        plain = [d.get("text/plain", "") for d in self.data]
        return strip_ansi("".join([self.stdout, self.stderr, *plain, self.error_text]))


def strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


class Kernel:
    """A kernel and a client, with `execute` returning a `CellOutput`."""

    def __init__(self, cwd: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("JPY_PARENT_PID", None)
        # ipykernel forwards what the kernel's processes write to its fds (a %dispy
        # local node's log lines) into the running cell, except under pytest: let
        # the cells show it, as they do in JupyterLab.
        env.pop("PYTEST_CURRENT_TEST", None)
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env=env, cwd=str(cwd))
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=CELL_TIMEOUT)

    @property
    def pid(self) -> int:
        provisioner: Any = self.manager.provisioner
        return int(provisioner.process.pid)

    def submit(self, code: str) -> str:
        """Send ``code`` for execution (as a notebook cell); return the message id."""
        return str(self.client.execute(code, store_history=True, allow_stdin=False))

    def collect(
        self,
        msg_id: str,
        timeout: float = CELL_TIMEOUT,
        out: CellOutput | None = None,
    ) -> CellOutput:
        """Gather the outputs of ``msg_id`` until the kernel is idle again (added to
        ``out``: what `follow` gathered of it so far)."""
        out = out if out is not None else CellOutput()
        self.follow(msg_id, out, lambda _: False, timeout)
        while True:  # wait_for_ready may have left kernel_info replies behind
            reply = self.client.get_shell_msg(timeout=CELL_TIMEOUT)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        out.status = reply["content"]["status"]
        for payload in reply["content"].get("payload", []):
            if payload.get("source") == "page":
                out.pager += strip_ansi(payload["data"].get("text/plain", ""))
        return out

    def follow(
        self,
        msg_id: str,
        out: CellOutput,
        until: Callable[[CellOutput], bool],
        timeout: float = CELL_TIMEOUT,
    ) -> None:
        """Gather the outputs of running cell ``msg_id`` into ``out`` until
        ``until(out)`` holds or the kernel is idle (``out.idle_at`` set)."""
        deadline = time.monotonic() + timeout
        while not (out.idle_at or until(out)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"cell did not get there in {timeout} s: {out}")
            try:
                msg = self.client.get_iopub_msg(timeout=left)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                name = "stdout" if content["name"] == "stdout" else "stderr"
                setattr(out, name, getattr(out, name) + content["text"])
                out.streams.append((name, content["text"]))
            elif kind == "error":  # the first names the error; a cell may show two
                if not out.ename:
                    out.ename, out.evalue = content["ename"], content["evalue"]
                out.traceback += list(content["traceback"])
            elif kind in ("execute_result", "display_data"):
                out.data.append(content["data"])
            elif kind == "update_display_data":
                out.updates.append(content["data"])
            elif kind == "execute_input":
                out.execution_count = content["execution_count"]
            elif kind == "status" and content["execution_state"] == "idle":
                out.idle_at = time.monotonic()
                return

    def execute(self, code: str, timeout: float = CELL_TIMEOUT) -> CellOutput:
        return self.collect(self.submit(code), timeout)

    def run_ok(self, code: str, timeout: float = CELL_TIMEOUT) -> CellOutput:
        """Execute ``code``; fail the test if the cell raised."""
        out = self.execute(code, timeout)
        assert out.status == "ok", out.text
        return out

    def value(self, expression: str) -> Any:
        """``expression`` evaluated in the kernel (its repr parsed back)."""
        import ast

        out = self.run_ok(f"print(repr({expression}))")
        return ast.literal_eval(out.stdout.strip())

    def stop_button(self) -> None:
        """What JupyterLab's Stop (interrupt) does: SIGINT to the kernel's group."""
        os.killpg(self._group(), signal.SIGINT)

    def _group(self) -> int:
        """The kernel's process group (it leads its own: never the test's)."""
        group = os.getpgid(self.pid)
        assert group == self.pid != os.getpgid(0), "the kernel has no group of its own"
        return group

    def kill(self) -> None:
        """What a kernel restart does to a kernel: SIGKILL to its process group."""
        os.killpg(self._group(), signal.SIGKILL)
        self.manager.provisioner.process.wait()  # type: ignore[union-attr]

    def close(self) -> None:
        self.client.stop_channels()
        if self.manager.has_kernel:
            self.manager.shutdown_kernel(now=True)


@contextmanager
def kernel(cwd: Path) -> Iterator[Kernel]:
    """A started kernel, shut down (killed) at the end."""
    started = Kernel(cwd)
    try:
        yield started
    finally:
        started.close()


def node_pids(k: Kernel) -> list[int]:
    """Process ids of the local nodes ``%dispy local`` started in ``k``."""
    pids = k.value(
        "get_ipython().magics_manager.registry['DispyMagics'].session.local.pids"
    )
    return [int(pid) for pid in pids]


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait (at most ``timeout`` s) for ``pids`` and their children to exit; return
    those still alive."""
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs += [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    deadline = time.monotonic() + timeout
    while True:
        alive = [proc.pid for proc in procs if _alive(proc)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _alive(proc: psutil.Process) -> bool:
    """Running (a zombie waiting for a parent that does not reap has exited)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
