"""What a notebook cell says when its local nodes die under a running run, in a
real kernel: each node's loss once, in the client's words. The computation
processes the dead nodes leave behind (they end themselves at once) printed
"computation process: node server gone; stopping" into the cell as well, bare and
once per computation, through the stderr they share with the kernel."""

from __future__ import annotations

import functools
import os
import queue
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.jobs import computation_processes, mark_and_sleep, wait_for_path
from tests.jupyter.kernel import CELL_TIMEOUT, Kernel, kernel, node_pids, wait_gone
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow


@pytest.mark.timeout(120)
def test_local_nodes_killed_under_a_run_are_said_once_each(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    with kernel(tmp_path) as k:
        k.run_ok("%load_ext dispynb\n%dispy local --nodes 2 --cpus 1")
        nodes = node_pids(k)
        msg_id = k.submit(
            '%%dispy --over "range(4)" --into doomed\n'
            "def doomed(i):\n"
            "    import time\n"
            f"    open({str(marks)!r} + f'/{{i}}', 'w').close()\n"
            "    time.sleep(600)"
        )
        deadline = time.monotonic() + CELL_TIMEOUT
        while len(list(marks.iterdir())) < 2:  # a job on each node
            assert time.monotonic() < deadline, "the jobs did not start"
            time.sleep(0.05)
        computations = _below(nodes)
        assert computations, "no computation process"
        for pid in nodes:  # as the OOM killer would
            os.kill(pid, signal.SIGKILL)
        assert wait_gone(computations, 10) == []  # what they print comes before
        out = k.collect(msg_id)
        after = k.run_ok("%dispy status")
        later = _streams_until_shut_down(k)  # what came after the cells ended

    text = out.text + after.text + later
    assert "all 4 jobs of run 'doomed' failed" in out.text, out.text
    gone = re.findall(r"(127\.0\.0\.1:\d+) gone", after.text)
    assert len(gone) == 2, after.text
    for address in gone:
        assert out.stderr.count(f"node {address} left") == 1, out.stderr
        # Their failures are counted by the node they lost, named whole (before:
        # '(node 127.0.0.1)', the reason cut at its address's colon).
        assert f"node {address} was lost" in out.error_text, out.error_text
    assert "(node 127.0.0.1)" not in out.text, out.text
    # Once for the run, not per node: what would have kept the jobs.
    assert out.stderr.count("with %%dispy --reentrant (reentrant=True)") == 1, out.text
    # Before: "computation process: node server gone; stopping", once a node.
    assert "computation process" not in text and "server gone" not in text, text


def _below(nodes: list[int]) -> list[int]:
    """The computation processes (and their workers) of ``nodes``."""
    return [p.pid for pid in nodes for p in computation_processes(psutil.Process(pid))]


def _streams_until_shut_down(k: Kernel) -> str:
    """The kernel shut down as JupyterLab does: what it printed meanwhile (to any
    cell), until it is silent."""
    k.manager.shutdown_kernel(now=False)
    texts = []
    while True:
        try:
            msg = k.client.get_iopub_msg(timeout=2)
        except queue.Empty:
            return "".join(texts)
        if msg["msg_type"] == "stream":
            texts.append(msg["content"]["text"])


@pytest.mark.timeout(60)
def test_a_killed_nodes_computation_processes_print_nothing(tmp_path: Path) -> None:
    """What the cell got through the stderr it shares with the node, made sure of:
    the computation processes of a node killed while one runs a job and another
    its setup print nothing there (before: the line above, once each). The node
    logs at warning, as a %dispy local node does: the processes log as it does."""
    from dispynb import JobCluster

    with running_node(tmp_path / "node", "--loglevel", "warning", cpus=2) as node:
        job, setup = tmp_path / "job", tmp_path / "setup"
        running = JobCluster(mark_and_sleep, nodes=[node.spec], secret=node.secret)
        starting = JobCluster(
            mark_and_sleep,
            nodes=[node.spec],
            secret=node.secret,
            setup=functools.partial(mark_and_sleep, str(setup), 600),
        )
        try:
            running.submit(str(job), 600)
            starting.submit(None, 0)
            for path in (job, setup):
                wait_for_path(path)
            computations = _below([node.proc.pid])
            node.proc.kill()
            node.proc.wait()
            assert wait_gone(computations, 10) == []
        finally:
            running.close(terminate=True, timeout=5)
            starting.close(terminate=True, timeout=5)
        log = node.log_text()
    assert "node server gone" not in log, log


@pytest.mark.timeout(120)
def test_reentrant_runs_a_lost_nodes_jobs_on_the_other_node(tmp_path: Path) -> None:
    """``%%dispy --reentrant``: the job of a killed local node runs again on the
    other one; the run counts it once, finished, not failed (before: no such
    option; the cell could only lose the job, Abandoned)."""
    marks, go = tmp_path / "marks", tmp_path / "go"
    marks.mkdir()
    with kernel(tmp_path) as k:
        k.run_ok("%load_ext dispynb\n%dispy local --nodes 2 --cpus 1")
        nodes = node_pids(k)
        k.run_ok(
            '%%dispy --over "range(2)" --into moved --reentrant --nowait\n'
            "def moved(i):\n"
            "    import os, time\n"
            f"    open({str(marks)!r} + f'/{{dispy_node_name}}-{{i}}', 'w').close()\n"
            f"    while not os.path.exists({str(go)!r}):\n"
            "        time.sleep(0.02)\n"
            "    return dispy_node_name"
        )
        deadline = time.monotonic() + CELL_TIMEOUT
        while not k.value("moved.counts().running"):  # the run saw a job start
            assert time.monotonic() < deadline, "no job started"
            time.sleep(0.05)
        # The node says a job started as it hands it to a worker: its mark comes
        # a moment later (a CI run under load looked before it).
        while not any(marks.iterdir()):
            assert time.monotonic() < deadline, "no job wrote its mark"
            time.sleep(0.05)
        lost = int(next(marks.iterdir()).name.split("-")[1])  # local-N runs it
        doomed = _below(nodes[lost : lost + 1])
        os.kill(nodes[lost], signal.SIGKILL)  # under its job
        assert wait_gone(doomed, 10) == []  # its job cannot see go and end there
        go.touch()
        out = k.run_ok("moved.wait()\nprint(moved.counts())")
        results = k.value("moved.results")
    assert results == [f"local-{1 - lost}"] * 2, out.text
    assert "finished=2, failed=0" in out.text, out.text
