"""Stop (SIGINT to a real kernel's process group, as JupyterLab's Stop button) at
the moments between the steps of a ``%%dispy`` cell: as the cluster takes a job, as
the progress bar shows, as a job's output is written, as the run's cluster closes,
and pressed twice. Whenever it comes, the cell ends with one line
(`RunInterrupted`), no job runs on, no cluster stays open, and nothing the run
received goes unsaid.

Each test makes the kernel signal its own group at one such moment (a function of
dispynb's wrapped in the kernel: `STOP_AT`), once, instead of hoping a test's timing
hits a window of microseconds; the signal and its handling are the real ones.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from tests.jupyter.kernel import CellOutput, Kernel, kernel, node_pids
from tests.jupyter.test_kernel_stop import JOB_SECONDS, STOPPED_WITHIN

pytestmark = pytest.mark.slow

#: Defines ``stop_at(owner, name, after=False, call=1)``: the ``call``-th call of
#: ``owner.name`` presses Stop (``os.killpg`` of the kernel's own group), before the
#: function runs or just after it returned.
STOP_AT = """
import functools, os, signal

def stop_at(owner, name, after=False, call=1):
    original = getattr(owner, name)
    calls = []

    @functools.wraps(original)
    def pressing(*args, **kwargs):
        calls.append(1)
        now = len(calls) == call
        if now and not after:
            os.killpg(os.getpgid(0), signal.SIGINT)
        result = original(*args, **kwargs)
        if now and after:
            os.killpg(os.getpgid(0), signal.SIGINT)
        return result

    setattr(owner, name, pressing)
"""

#: Four jobs: ``quick`` ones print and return at once, the others wait for a gate
#: the tests never open (`JOB_SECONDS`): a cell that ended did not wait for them.
CELL = f"""%%dispy --over WORK --unpack --into victim --progress html
def job(i, quick, gate):
    import os, time
    if quick:
        print(f"hello from job {{i}}")
        return i
    deadline = time.monotonic() + {JOB_SECONDS}
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    return i
"""

#: What is left: the clusters of the kernel still open (dispynb's own probes
#: aside) and the statuses of the run's jobs.
LEFT = (
    "([c.name for c in __import__('dispynb.monitoring').monitoring.live_clusters() "
    "if not c._closed and c.name != '_dispynb_node_probe'], "
    "[j.status.name for j in victim.jobs])"
)


def _start(k: Kernel, tmp_path: Path, quick: int) -> list[int]:
    """Local nodes, `STOP_AT`, and ``WORK``: ``quick`` quick jobs of four."""
    k.run_ok("%load_ext dispynb\n%dispy local --cpus 2")
    k.run_ok(STOP_AT)
    gate = str(tmp_path / "gate")
    k.run_ok(f"WORK = [(i, i < {quick}, {gate!r}) for i in range(4)]")
    return node_pids(k)


def _stopped(k: Kernel, nodes: list[int]) -> tuple[CellOutput, list[str]]:
    """Run `CELL` (Stop comes as set up); check it ended by Stop, promptly, with
    nothing left open; the statuses of its jobs."""
    started = time.monotonic()
    out = k.execute(CELL, timeout=STOPPED_WITHIN)
    assert time.monotonic() - started < STOPPED_WITHIN
    assert out.status == "error" and out.ename == "RunInterrupted", out.text
    assert "Traceback" not in out.error_text and "dispynb/" not in out.error_text
    assert all(psutil.pid_exists(pid) for pid in nodes)
    open_clusters, statuses = k.value(LEFT)
    assert open_clusters == [], out.text
    assert set(statuses) <= {"Finished", "Cancelled", "Terminated"}, statuses
    # The nodes serve the next cell.
    k.run_ok('%%dispy --over "range(2)" --into after\ndef sq(x):\n    return x * x')
    assert k.value("after.results") == [0, 1]
    return out, statuses


@pytest.mark.timeout(180)
def test_stop_as_the_cluster_takes_a_job_counts_and_cancels_it(tmp_path):
    """Before: a job the cluster took but the run had not counted yet was left
    out of the run (its jobs, its account: '(0 of 2 jobs done)')."""
    with kernel(tmp_path) as k:
        nodes = _start(k, tmp_path, quick=0)
        k.run_ok(
            "from dispynb import JobCluster\nstop_at(JobCluster, 'submit', True, 3)"
        )
        out, statuses = _stopped(k, nodes)
    assert len(statuses) == 3 and "Finished" not in statuses, out.text
    assert "(0 of 3 jobs done)" in out.text, out.text


@pytest.mark.timeout(180)
def test_stop_as_the_progress_bar_shows_stops_the_jobs(tmp_path):
    """Before: Stop as the bar was displayed, before the wait began, raised a bare
    KeyboardInterrupt and left the four jobs running, their cluster open."""
    with kernel(tmp_path) as k:
        nodes = _start(k, tmp_path, quick=0)
        k.run_ok(
            "from dispynb.jupyter.progress import HTMLProgressBar\n"
            "stop_at(HTMLProgressBar, 'show', after=True)"
        )
        out, statuses = _stopped(k, nodes)
    assert len(statuses) == 4 and "Finished" not in statuses, out.text
    assert "Interrupted: run 'victim' stopped" in out.text, out.text


@pytest.mark.timeout(180)
def test_stop_pressed_twice_still_cancels_the_jobs(tmp_path):
    """The second press comes as the first one's cancellation is being sent.
    Before: it cut the cancellation short: a bare KeyboardInterrupt, the jobs
    running on, their cluster open."""
    with kernel(tmp_path) as k:
        nodes = _start(k, tmp_path, quick=0)
        k.run_ok(
            "from dispynb.jupyter.run import Run\n"
            "stop_at(Run, 'cancel')\n"
            "from dispynb.jupyter.progress import HTMLProgressBar\n"
            "stop_at(HTMLProgressBar, 'update', call=3)"  # the first press
        )
        out, statuses = _stopped(k, nodes)
    assert len(statuses) == 4 and "Finished" not in statuses, out.text


@pytest.mark.timeout(180)
def test_stop_as_a_job_output_is_written_still_shows_it(tmp_path):
    """Before: the job whose output was about to be written when Stop came was
    never shown (taken off the queue, then dropped)."""
    with kernel(tmp_path) as k:
        nodes = _start(k, tmp_path, quick=1)
        k.run_ok(
            "from dispynb.jupyter.runoutput import _RunOutput\n"
            "stop_at(_RunOutput, '_write_job')"
        )
        out, statuses = _stopped(k, nodes)
    assert statuses[0] == "Finished", statuses
    assert "hello from job 0" in out.stdout, out.text


@pytest.mark.timeout(180)
def test_stop_as_the_run_closes_its_cluster_closes_it(tmp_path):
    """All four jobs done, Stop as the run closes its cluster. Before: a bare
    KeyboardInterrupt, and the cluster stayed open (the run took it for closed)."""
    with kernel(tmp_path) as k:
        nodes = _start(k, tmp_path, quick=4)
        k.run_ok("from dispynb import JobCluster\nstop_at(JobCluster, 'close')")
        out, statuses = _stopped(k, nodes)
    assert statuses == ["Finished"] * 4, out.text
    assert "(4 of 4 jobs done)" in out.text, out.text


@pytest.mark.timeout(120)
def test_stop_before_the_run_begins_is_one_line(tmp_path):
    """Stop as the magic reads its cell (here: as it looks the function up), a few
    milliseconds after Run was pressed. Before: a bare KeyboardInterrupt with
    dispynb's frames, and ``victim`` still the run of an earlier cell."""
    with kernel(tmp_path) as k:
        _start(k, tmp_path, quick=4)
        k.run_ok(CELL)
        k.run_ok(
            "from dispynb.jupyter.cellrun import CellRunner\n"
            "stop_at(CellRunner, '_lookup')"
        )
        out = k.execute(CELL, timeout=STOPPED_WITHIN)
        assert out.ename == "RunInterrupted", out.text
        assert "Traceback" not in out.error_text and "dispynb/" not in out.error_text
        assert "before its run began; no job was sent" in out.text, out.text
        assert "not started" in k.value("repr(victim)")
