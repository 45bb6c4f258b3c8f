"""`nodeserver.rehearsal`: trivial jobs through the worker loop before the zygote forks.

Each case runs in a new interpreter (as the node does, before any thread or child):
the rehearsal must leave that process as it found it, and never touch its children.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.jobs import WAIT

_CHECK = textwrap.dedent(
    """
    import json, os, signal, sys, threading
    from nodeserver.jobapi import CONTEXT
    from nodeserver.rehearsal import rehearse

    def state():
        return {
            "sigint": repr(signal.getsignal(signal.SIGINT)),
            # A worker's are its own (nodeserver.jobsigint): never the node's.
            "signal": [signal.signal.__module__, signal.getsignal.__module__],
            "fds": sorted(os.listdir("/proc/self/fd")),
            "threads": threading.active_count(),
            "stdout": sys.stdout is sys.__stdout__,
            "stderr": sys.stderr is sys.__stderr__,
            "cwd": os.getcwd(),
            "context": [CONTEXT.sock is None, CONTEXT.key, CONTEXT.attempt],
        }

    child = None
    if sys.argv[1] == "child":
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:
            os.read(read_end, 1)  # until the parent lets go
            os._exit(0)
    before = state()
    ok = rehearse()
    after = state()
    alive = None
    if child is not None:
        alive = os.waitpid(child, os.WNOHANG) == (0, 0)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    print(json.dumps({"ok": ok, "before": before, "after": after, "alive": alive}))
    """
)


def _run(mode: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _CHECK, mode],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_rehearsal_runs_its_jobs_and_leaves_the_process_as_it_was() -> None:
    seen = _run("alone")
    assert seen["ok"] is True  # every job finished, with the right result
    # Its SIGINT handler and signal functions, descriptors, threads, output
    # streams and job context.
    assert seen["after"] == seen["before"]


def test_rehearsal_does_nothing_where_the_process_has_a_child() -> None:
    # The worker loop ends what a job leaves running: a rehearsal in a process
    # with children would kill them.
    seen = _run("child")
    assert seen["ok"] is False
    assert seen["alive"] is True
    assert seen["after"] == seen["before"]
