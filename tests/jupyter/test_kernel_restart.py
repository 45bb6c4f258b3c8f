"""Restarting (killing) a kernel leaves no jobs running on the nodes.

A kernel restart kills the kernel process: no ``atexit`` handler, no ``close()``. The
client here is a separate process (a script using `Run.map`, or an IPython shell
using ``%%dispy --nowait``) that submits long jobs to nodes this test started, and is
killed with SIGKILL while they run. The node must then end that client's
computation processes and workers on its own, and keep serving other clients.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dispynb import LocalCluster
from dispynb.jupyter.run import Run
from tests import jobs

pytestmark = pytest.mark.slow

#: Seconds the nodes get to end a dead client's processes.
CLEANUP = 10.0

ROOT = Path(__file__).resolve().parents[2]

LONG_JOB = """
def long_job(mark):
    import os, time
    with open(mark + ".tmp", "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(mark + ".tmp", mark)
    time.sleep(60)
    open(mark + ".finished", "w").close()
    return mark
"""

CLIENTS = {
    "run_map": LONG_JOB
    + """
import sys, time
from dispynb.jupyter.run import Run

nodes, marks = sys.argv[1].split(","), sys.argv[2].split(",")
run = Run.map(long_job, marks, nodes=nodes, wait=False, progress="none")
print("submitted", flush=True)
time.sleep(120)  # killed long before
""",
    "magic_nowait": f"CELL = {LONG_JOB!r}\n"
    + """
import sys, time
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

config = Config()
config.HistoryManager.hist_file = ":memory:"
ip = InteractiveShell.instance(config=config)
ip.run_line_magic("load_ext", "dispynb")
nodes, marks, secret_file = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3]
ip.run_line_magic("dispy", f"nodes {' '.join(nodes)} --secret-file {secret_file}")
ip.user_ns["marks"] = marks
ip.run_cell_magic("dispy", "--over marks --into victims --nowait", CELL)
print("submitted", flush=True)
time.sleep(120)  # killed long before
""",
}


@pytest.fixture
def nodes() -> Iterator[LocalCluster]:
    """Two nodes of one CPU: two jobs run, two wait in the queue."""
    with LocalCluster(nodes=2, cpus=1) as cluster:
        yield cluster


def node_children(cluster: LocalCluster) -> list[psutil.Process]:
    """The nodes' computation processes and workers (not their zygotes, which
    live as long as the node)."""
    found = []
    for pid in cluster.pids:
        try:
            found += jobs.computation_processes(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return found


def describe(procs: list[psutil.Process]) -> list[str]:
    lines = []
    for proc in procs:
        try:
            lines.append(f"{proc.pid} {proc.status()} {' '.join(proc.cmdline()[:5])}")
        except psutil.NoSuchProcess:
            continue
    return lines


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_killed_client_leaves_no_computation_or_worker_on_the_nodes(
    client, nodes, tmp_path
):
    assert node_children(nodes) == []  # idle nodes have no computation processes
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(CLIENTS[client]))
    secret_file = tmp_path / "secret"
    secret_file.write_text(nodes.secret)
    secret_file.chmod(0o600)
    marks = [str(tmp_path / f"job{i}") for i in range(4)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DISPYNB_SECRET": nodes.secret}
    if client == "magic_nowait":
        env.pop("DISPYNB_SECRET")  # the magic reads --secret-file
    out, err = (tmp_path / "out").open("w"), (tmp_path / "err").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            ",".join(nodes.node_specs()),
            ",".join(marks),
            str(secret_file),
        ],
        env=env,
        stdout=out,
        stderr=err,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:

        def two_running() -> bool:
            assert proc.poll() is None, (tmp_path / "err").read_text()
            return sum(os.path.exists(m) for m in marks) == 2

        jobs.wait_until(two_running)
        running = node_children(nodes)
        assert running, "the running jobs' processes should be children of the nodes"
        job_pids = {jobs.read_pid(m) for m in marks if os.path.exists(m)}
        assert job_pids <= {p.pid for p in running}

        proc.send_signal(signal.SIGKILL)  # what a kernel restart does
        proc.wait(timeout=jobs.WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        err.close()

    _gone, alive = psutil.wait_procs(running, timeout=CLEANUP)
    left = describe(alive + [p for p in node_children(nodes) if p not in alive])
    assert left == [], f"still running on the nodes {CLEANUP} s after the kill: {left}"
    assert not any(os.path.exists(m + ".finished") for m in marks)
    assert not any(psutil.pid_exists(pid) for pid in job_pids)
    assert all(psutil.pid_exists(pid) for pid in nodes.pids)

    # The nodes are free for the next kernel at once (not "busy" with the dead one).
    after = Run.map(jobs.square, range(4), nodes=nodes, progress="none")
    assert after.results == [0, 1, 4, 9]
