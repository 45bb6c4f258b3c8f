"""A user's thread that takes the I/O loop's place (`LoopRunner.enter`), met the way
users meet it: Ctrl-C to the whole process group while the main thread reads the
nodes' answers itself (`NodesBackend.wait_here`) or sends a job itself
(`NodesBackend.submit`), callbacks that run meanwhile, several threads at once, a
node killed while a user thread reads its socket.

The Ctrl-C programs run in a session of their own (as a terminal's foreground job
or a kernel): ``os.killpg`` of their group then reaches them and nothing else (the
LocalCluster's nodes run in sessions of their own, out of reach of it, as
`dispynb.local` starts them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

# The user's program: ``square`` jobs one at a time; a Ctrl-C to the process group
# lands at the chosen moment (ARM) of the main thread's own work with the loop.
_PROGRAM = """
import json, os, signal, sys, threading, time
from dispynb import JobCluster, LocalCluster
from dispynb.node import DispyNode
from dispynb.protocol.messages import JobResults
from dispynb.transport.links import SocketLink

def square(x):
    return x * x

main = threading.main_thread()
fired = []

def interrupt_once():
    if not fired and threading.current_thread() is main:
        fired.append(time.monotonic())
        os.killpg(os.getpgrp(), signal.SIGINT)

lost = []
report = {}
with LocalCluster(cpus=1) as local, JobCluster(
    square,
    nodes=local,
    pulse_interval=0.2,
    cluster_status=lambda status, node, job: (
        lost.append(str(node)) if status == DispyNode.Closed else None
    ),
) as cluster:
    driver = cluster._backend.driver
ARM
    interrupted = None
    submitted = []
    for x in range(200):
        try:
            job = cluster.submit(x)
            submitted.append((x, job))
            job()
        except KeyboardInterrupt:
            interrupted = x
            break
    report["fired"] = bool(fired)
    report["interrupted"] = interrupted
    # Afterwards: every job submitted ends once, with its result; later jobs too.
    later = [(100 + x, cluster.submit(100 + x)) for x in range(20)]
    report["later"] = [job() for _x, job in later]
    report["stuck"] = cluster.wait(timeout=30) is False
    report["jobs"] = [
        (x, job.status.name, job.result) for x, job in submitted + later
    ]
    report["lost"] = list(lost)
    report["nodes"] = [(n.jobs_done, n.avail_cpus) for n in cluster.status().nodes]
print(json.dumps(report), flush=True)
"""

# Where the Ctrl-C lands (indented into the program's ``with`` block).
_ARMS = {
    # While the main thread handles a node's results message it read itself.
    "reading": """
    on_results = driver._routes[JobResults]
    def results(*args):
        interrupt_once()
        return on_results(*args)
    driver._routes[JobResults] = results
""",
    # While the main thread sends a job itself (d66f24c): scheduled, not yet written.
    "submitting": """
    apply = driver._apply
    def scheduled(instructions):
        if any(type(i).__name__ == "SendJobs" for i in instructions):
            interrupt_once()
        return apply(instructions)
    driver._apply = scheduled
""",
}


def _run_program(arm: str) -> dict[str, object]:
    program = _PROGRAM.replace("ARM", _ARMS[arm].strip("\n"))
    proc = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # its own group: the killpg reaches nothing else
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-4000:]
    report: dict[str, object] = json.loads(lines[-1])
    return report


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arm", sorted(_ARMS))
def test_ctrl_c_to_the_process_group_while_the_main_thread_holds_the_loop(
    arm: str,
) -> None:
    """The KeyboardInterrupt reaches the user; the loop gets its sockets back and
    the cluster goes on: no node lost, every job ends once with its result."""
    report = _run_program(arm)
    assert report["fired"], "the main thread never did that work itself"
    interrupted = report["interrupted"]
    assert isinstance(interrupted, int), report
    assert report["later"] == [(100 + x) ** 2 for x in range(20)]
    assert not report["stuck"], report
    assert report["lost"] == [], report
    done = report["jobs"]
    assert isinstance(done, list)
    # Every job submitted (the interrupted one too, if it was) ended once, right.
    xs = [x for x, _status, _result in done]
    assert len(xs) == len(set(xs)), done
    for x, status, result in done:
        assert (status, result) == ("Finished", x * x), done
    assert set(range(interrupted)) | set(range(100, 120)) <= set(xs)
    nodes = report["nodes"]
    assert isinstance(nodes, list)
    # A job whose submit() was interrupted may have gone out: done once, too.
    assert [n[0] for n in nodes] in ([len(xs)], [len(xs) + 1]), report
