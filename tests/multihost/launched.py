"""What the SSH and SLURM launcher tests share (``test_ssh_adapt.py`` and
``test_slurm_adapt.py``, ``test_ssh_notebook.py`` and ``test_slurm_notebook.py``).

`adapt_client` is the adaptive-scaling client program, given the code that makes the
launcher's nodes, and `check_adapted` what both scenarios must show; `run_notebook` and
`save_outputs` run an example notebook under nbval (and store its outputs) on the
client host; `host_python` is the hosts' Python; `node_pids` finds node servers left
on a host.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.multihost.netns import Host, Network
from tests.nodeproc import ROOT

_ADAPT_PREAMBLE = """import logging
import os
import sys
import time

import dispynb

logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(created)f %(name)s %(levelname)s %(message)s")


def hold(release, x):
    # Runs until the file `release` exists (the test's clock, not a sleep).
    import os, time
    while not os.path.exists(release):
        time.sleep(0.02)
    return x * 10, dispy_node_name


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def events(nodes, action):
    return [e for e in nodes.events if e.action == action]


"""

_ADAPT_SCENARIO = """    out = {}
    with nodes:
        nodes.adapt(minimum=1, maximum=3, idle_timeout=2.0, interval=0.2, cooldown=1.0)
        cluster = dispynb.JobCluster(hold, nodes=nodes)
        size = lambda: len(cluster.status().nodes)
        out["start"] = size()
        # -- a burst: 6 jobs for 1 CPU per node -> 3 nodes (the maximum)
        first = args["dir"] + "/release-1"
        t0 = time.time()
        jobs = [cluster.submit(first, i) for i in range(6)]
        wait_until(lambda: size() == 3, 120, "grown to 3 nodes")
        out["up_s"] = time.time() - t0
        out["launched_in_burst"] = len(events(nodes, "launch")) - 1
        if "hosts" in args:  # SSHNodes: one node per host
            out["hosts_up"] = sorted(n.host for n in nodes.nodes)
        open(first, "w").close()
        results = [job() for job in jobs]
        out["results"] = [r[0] for r in results]
        out["ran_on"] = len({r[1] for r in results})
        t1 = max(job.end_time for job in jobs)
        # -- idle: back to the minimum (idle_timeout, then drain and stop)
        wait_until(lambda: len(events(nodes, "stopped")) == 2, 120, "shrunk to 1")
        out["down_s"] = events(nodes, "stopped")[-1].time - t1
        out["after_idle"] = size()
        out["most_active"] = max_active(nodes)
        # -- a long job on a node chosen for removal: 2 nodes, a long job each,
        # then the maximum lowered to 1
        nodes.adapt(minimum=2, maximum=2, idle_timeout=2.0, interval=0.2)
        wait_until(lambda: size() == 2, 120, "grown to 2 for the long jobs")
        second = args["dir"] + "/release-2"
        long_jobs = [cluster.submit(second, i) for i in range(2)]
        wait_until(lambda: all(j.status == dispynb.DispyJob.Running
                               for j in long_jobs), 60, "long jobs running")
        nodes.adapt(minimum=1, maximum=1, idle_timeout=2.0, interval=0.2)
        wait_until(lambda: len(events(nodes, "drain")) == 3, 30, "a busy node drained")
        drained = events(nodes, "drain")[-1]
        out["drain_why"] = drained.detail
        time.sleep(0.5)  # a drained node with a running job must not stop: look
        out["stopped_while_running"] = len(events(nodes, "stopped")) > 2
        open(second, "w").close()
        long_results = [job() for job in long_jobs]
        out["long_results"] = [r[0] for r in long_results]
        out["long_status"] = [job.status.name for job in long_jobs]
        on_drained = [
            j for j, r in zip(long_jobs, long_results) if r[1] == drained.node
        ]
        out["on_drained"] = len(on_drained)
        wait_until(lambda: len(events(nodes, "stopped")) == 3, 60, "drained stopped")
        stopped = events(nodes, "stopped")[-1]
        out["stopped_node"] = stopped.node == drained.node
        out["stopped_after_job"] = stopped.time >= on_drained[0].end_time
        cluster.close()
    out["exited"] = nodes.exited()
    return out


def max_active(nodes):
    # The most nodes running at once, replayed from the events.
    count = best = 0
    for e in nodes.events:
        count += {"launch": 1, "stopped": -1}.get(e.action, 0)
        best = max(best, count)
    return best
"""


def adapt_client(make_nodes: str) -> str:
    """The adaptive-scaling client program (for `netns.start_client`).

    ``make_nodes`` defines ``make_nodes(args)``, returning the launcher not started
    (``start=False`` or no node yet). The scenario: ``adapt(1, 3)``, a burst of 6
    one-CPU jobs grows it to 3 nodes, idleness shrinks it to 1; then 2 nodes with a
    long job each, the maximum lowered to 1: the busy node drained finishes its job
    before it stops. With ``args["hosts"]``, the hosts the nodes ran on are reported.
    """
    main = "def main(args):\n    nodes = make_nodes(args)\n"
    return _ADAPT_PREAMBLE + make_nodes.strip() + "\n\n\n" + main + _ADAPT_SCENARIO


def check_adapted(out: dict[str, Any], stderr: str, launcher: str) -> None:
    """Print the measured scale-up and scale-down times; assert what both launchers
    must show."""
    print(
        f"\nadapt over {launcher}: scale-up 1 -> 3 nodes in {out['up_s']:.2f} s after"
        f" the burst; scale-down 3 -> 1 in {out['down_s']:.2f} s after the last job"
        " (idle_timeout 2 s included)"
    )
    assert out["start"] == 1  # the minimum
    assert out["launched_in_burst"] == 2 and out["most_active"] == 3  # the maximum
    assert out["results"] == [i * 10 for i in range(6)]
    assert out["ran_on"] == 3
    assert out["after_idle"] == 1
    # The long jobs: the busy node drained finished its job, then stopped.
    assert out["drain_why"] == "over the maximum of 1"
    assert out["stopped_while_running"] is False
    assert out["long_results"] == [0, 10]
    assert out["long_status"] == ["Finished", "Finished"]
    assert out["on_drained"] == 1
    assert out["stopped_node"] and out["stopped_after_job"]
    assert out["exited"] == []
    assert "adapt: 1 to 3 nodes" in stderr


def host_python(directory: Path) -> Path:
    """A ``python`` for the hosts' launchers: this one, with the repo importable."""
    python = directory / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return python


def node_pids(host: Host) -> list[int]:
    """Pids of node servers running in ``host``."""
    listing = subprocess.run(
        ["ip", "netns", "pids", host.netns], capture_output=True, text=True, timeout=10
    ).stdout.split()
    pids = []
    for pid in listing:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"nodeserver" in cmdline:
            pids.append(int(pid))
    return pids


def run_notebook(
    network: Network,
    client_host: Host,
    notebook: Path,
    env: dict[str, str],
    logs: Callable[[], str] = str,
) -> None:
    """Run ``notebook`` under nbval on ``client_host``; every code cell must pass
    (``logs()`` is added to a failure's message)."""
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    argv += ["--timeout", "240", str(notebook)]
    done = network.run(client_host, argv, timeout=270, env=env, cwd=ROOT)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{out}\n{logs()}"
    cells = sum(1 for c in notebook.read_text().split('"cell_type": "code"')[1:])
    assert f"{cells} passed" in out, out


#: The interpreter the saved outputs of a notebook name (`save_outputs`).
NEUTRAL_PYTHON = "/opt/venv/bin/python"


def save_outputs(
    network: Network, client_host: Host, notebook: Path, env: dict[str, str]
) -> None:
    """Execute ``notebook`` once more with nbclient and store its outputs (what the
    documentation site shows, as the site cannot run it)."""
    code = (
        "import nbformat, nbclient, sys\n"
        "nb = nbformat.read(sys.argv[1], as_version=4)\n"
        "nbclient.NotebookClient(nb, timeout=45, kernel_name='python3',"
        " resources={'metadata': {'path': sys.argv[2]}}).execute()\n"
        "nbformat.write(nb, sys.argv[1])\n"
    )
    argv = [sys.executable, "-c", code, str(notebook), str(notebook.parent)]
    done = network.run(client_host, argv, timeout=270, env=env)
    assert done.returncode == 0, done.stderr
    # The site shows a reader's interpreter, not this machine's venv.
    text = notebook.read_text().replace(sys.executable, NEUTRAL_PYTHON)
    notebook.write_text(text)
