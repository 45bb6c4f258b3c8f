"""Programs that run a daemon (``python -m nodeserver``, ``python -m schedserver``)
with a hook at a moment of its start-up a test must hit every time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "node_with_graces",
    "run_in_own_group",
    "signalled_as_loop_closes",
    "stopped_as_loop_starts",
]

_STOPPED_AS_LOOP_STARTS = """\
import asyncio, os, signal, sys
run = asyncio.run
class Stop:
    def __del__(self):
        if os.getpgid(0) == os.getpid():  # its own group, never the test's
            os.killpg(0, signal.SIGTERM)
def starting(main, **kwargs):
    Stop()  # collected at once: the handler runs in its __del__
    return run(main, **kwargs)
asyncio.run = starting
import {module}.__main__ as m
sys.exit(m.main())
"""


def stopped_as_loop_starts(module: str) -> str:
    """A ``python -c`` program running ``module`` (``nodeserver`` or
    ``schedserver``) whose process group gets a SIGTERM as its event loop starts:
    after start-up's last checkpoint, before the loop's own handlers, inside a
    ``__del__`` (where Python drops what a signal handler raises), as a batch
    system or systemd signals a job's group or a unit's cgroup. Start it with
    ``start_new_session``: it signals only a group it leads."""
    return _STOPPED_AS_LOOP_STARTS.format(module=module)


_SIGNALLED_AS_LOOP_CLOSES = """\
import asyncio.unix_events as events, os, signal, sys
close = events._UnixSelectorEventLoop.close
def closing(loop):
    close(loop)
    os.kill(os.getpid(), signal.SIGTERM)
events._UnixSelectorEventLoop.close = closing
import {module}.__main__ as m
sys.exit(m.main())
"""


def signalled_as_loop_closes(module: str) -> str:
    """A ``python -c`` program running ``module`` that gets a SIGTERM as soon as
    its event loop closed, while the daemon stops (a second signal from a
    service manager or an impatient user)."""
    return _SIGNALLED_AS_LOOP_CLOSES.format(module=module)


_NODE_WITH_GRACES = """\
import sys
import nodeserver.compute
import nodeserver.jobstops
import nodeserver.workerlife
if {cancel!r} is not None:
    nodeserver.jobstops.CANCEL_GRACE = {cancel!r}
if {stop!r} is not None:  # its computation processes fork from a copy of it
    nodeserver.compute.STOP_GRACE = {stop!r}
    nodeserver.workerlife.SHUTDOWN_GRACE = {stop!r}  # its wait for them to exit
sys.argv = ["dispynb-node", *sys.argv[sys.argv.index("nodeserver") + 1 :]]
import nodeserver.__main__ as m
sys.exit(m.main())
"""


def node_with_graces(
    cancel: float | None = None, stop: float | None = None
) -> list[str]:
    """A `tests.nodeproc.start_node` ``launcher`` whose node gives a cancelled job
    ``cancel`` seconds (not `nodeserver.jobstops.CANCEL_GRACE`'s 3) to end after its
    KeyboardInterrupt, and a worker ``stop`` seconds (not
    `nodeserver.compute.STOP_GRACE`'s 2) to end after the SIGTERM of its
    computation's close (and waits as long for the computation to exit, not
    `nodeserver.workerlife.SHUTDOWN_GRACE`'s 10): a test whose outcome would
    come only after that long tells apart, with no clock, a kill at once from
    one after the grace."""
    return [sys.executable, "-c", _NODE_WITH_GRACES.format(cancel=cancel, stop=stop)]


def run_in_own_group(
    command: Sequence[str],
    env: Mapping[str, str],
    timeout: float,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` to its end as the leader of a process group of its own (as a
    batch system or systemd runs a daemon), its output captured; the whole group is
    SIGKILLed if it is still running after ``timeout`` seconds (which fails)."""
    proc = subprocess.Popen(
        command,
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
