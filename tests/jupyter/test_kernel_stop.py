"""Stop (interrupt) and restart of a real kernel that runs ``%dispy local`` nodes.

JupyterLab's Stop button makes jupyter_client send SIGINT to the kernel's whole
process group (``os.killpg``); a restart or a kill sends SIGKILL to it. These tests
signal the kernel exactly that way: Stop must cancel the cell's jobs and leave the
nodes serving the next cell; a killed kernel must leave no node behind.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.jupyter.kernel import CellOutput, kernel, node_pids, wait_gone

pytestmark = pytest.mark.slow

#: Seconds nodes get to notice their kernel died and exit.
ORPHAN_WAIT = 15.0

#: Seconds a job of `LONG_CELL` runs at most: its gate is never opened.
JOB_SECONDS = 600

#: Seconds Stop gets to end the cell: far below `JOB_SECONDS`, so a cell that
#: waited for its jobs instead could not end within it, however loaded the machine.
STOPPED_WITHIN = 60.0

#: Jobs that mark their start, then wait for a gate (``WORK``: (mark, gate)).
LONG_CELL = f"""%%dispy --over WORK --unpack --into victim --progress html
def nap(mark, gate):
    import os, time
    open(mark + ".tmp", "w").close()
    os.replace(mark + ".tmp", mark)
    deadline = time.monotonic() + {JOB_SECONDS}
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.path.exists(gate)
"""


def work(tmp_path) -> str:
    """The cell that sets ``WORK``: 4 jobs, each with its mark, and a gate the test
    never opens."""
    marks, gate = str(tmp_path / "marks"), str(tmp_path / "gate")
    return f"WORK = [({marks!r} + f'/job{{i}}', {gate!r}) for i in range(4)]"


def _counts(out: CellOutput, text: str) -> list[str]:
    """The progress bar's texts so far (shown, then updated) that contain ``text``."""
    shown = (d.get("text/plain", "") for d in [*out.data, *out.updates])
    return [bar for bar in shown if text in bar]


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_stop_cancels_the_cell_and_keeps_the_local_nodes(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    with kernel(tmp_path) as k:
        k.run_ok("%load_ext dispynb\n%dispy local --cpus 2")
        k.run_ok(work(tmp_path))
        nodes = node_pids(k)
        kernel_group = os.getpgid(k.pid)
        assert all(os.getpgid(pid) != kernel_group for pid in nodes)

        msg_id = k.submit(LONG_CELL)
        wait_for(lambda: len(list(marks.glob("job?"))) == 2)  # 2 run, 2 queued
        # Stopped once all 4 are submitted, as its bar shows (else, loaded, Stop
        # could come before the last submit: fewer cancelled).
        out = CellOutput()
        k.follow(msg_id, out, lambda out: any(_counts(out, "/4 done")))
        pressed = time.monotonic()
        k.stop_button()
        # Ended by Stop, not by its jobs: they wait for a gate never opened.
        out = k.collect(msg_id, timeout=STOPPED_WITHIN, out=out)
        returned = out.idle_at - pressed

        assert out.status == "error" and out.ename == "RunInterrupted", out.text
        # One or two lines, no internal frames.
        assert "Traceback" not in out.error_text and "dispynb/" not in out.error_text
        # The Stop line in its progress line's words: the 4 jobs it ended are
        # cancelled, running or queued (before: '2 running terminated, 2 queued
        # cancelled' beside the bar's '0/4 done, 4 cancelled').
        bar = _counts(out, "/4 done")[-1]
        assert "0/4 done, 4 cancelled," in bar, bar
        stop_line = out.evalue  # the line the cell ends with, as Stop printed it
        assert stop_line.endswith(
            "run 'victim' stopped, 4 cancelled, 2 of them while running "
            "(0 of 4 jobs done)"
        ), stop_line
        assert "terminated" not in stop_line and "queued" not in stop_line, stop_line
        assert all(psutil.pid_exists(pid) for pid in nodes)
        counts = k.value("(victim.counts().cancelled, victim.counts().failed)")
        assert counts == (4, 0), out.text
        assert k.value("[j.status.name for j in victim.jobs]") == [
            "Terminated", "Terminated", "Cancelled", "Cancelled",
        ]  # fmt: skip
        assert k.value("len(victim.failures)") == 0

        # The next cell runs on the same nodes, and nothing else failed.
        again = k.run_ok(
            '%%dispy --over "range(4)" --into after\ndef sq(x):\n    return x * x\n'
        )
        assert k.value("after.results") == [0, 1, 4, 9], again.text
        assert node_pids(k) == nodes
        assert "Error" not in again.text and "failed" not in again.text, again.text
        print(f"Stop: the cell returned {returned:.2f} s after SIGINT to its group")


def test_killed_kernel_takes_its_local_nodes_along(tmp_path):
    """A killed kernel (a restart that waited too long, the OOM killer) leaves no
    node, worker or file: the nodes remove their private directory as they go
    (before, its nodes' directories, the files sent with --depends among them,
    stayed in the temporary directory for good)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    data = tmp_path / "data.txt"
    data.write_text("sent to the nodes once")
    with kernel(tmp_path) as k:
        k.run_ok("%load_ext dispynb\n%dispy local --nodes 2 --cpus 1")
        k.run_ok(work(tmp_path))
        k.run_ok(
            f'%%dispy --over "range(2)" --depends "[{str(data)!r}]"\n'
            "def read(i):\n    return open('data.txt').read()"
        )
        private = k.value(
            "get_ipython().magics_manager.registry['DispyMagics'].session.local._dir"
        )
        assert os.path.isdir(private)
        nodes = node_pids(k)
        k.submit(LONG_CELL.replace("--into victim", "--nowait"))
        wait_for(lambda: len(list(marks.glob("job?"))) == 2)
        everything = list(nodes)
        for pid in nodes:
            everything += [p.pid for p in psutil.Process(pid).children(recursive=True)]
        k.kill()  # a restart: SIGKILL to the kernel's group; nodes are not in it
        assert wait_gone(everything, ORPHAN_WAIT) == []
        left = sorted(str(p) for p in Path(private).rglob("*"))
        assert not os.path.exists(private), left


def test_shutdown_and_restart_stop_the_local_nodes(tmp_path):
    with kernel(tmp_path) as k:
        k.run_ok("%load_ext dispynb\n%dispy local --cpus 1")
        first = node_pids(k)
        k.manager.restart_kernel(now=False)  # JupyterLab's "Restart Kernel"
        k.client.wait_for_ready(timeout=60)
        assert wait_gone(first, ORPHAN_WAIT) == []
        k.run_ok("%load_ext dispynb\n%dispy local --cpus 1")
        second = node_pids(k)
        k.manager.shutdown_kernel(now=False)  # "Shut Down Kernel"
        assert wait_gone(second, ORPHAN_WAIT) == []


def test_ctrl_c_in_a_terminal_does_not_reach_local_nodes(tmp_path):
    """A script's Ctrl-C (SIGINT to the terminal's foreground group) interrupts the
    script, whose exit then stops its nodes: they never see the SIGINT themselves."""
    import subprocess
    import sys

    from tests.jupyter.kernel import ROOT

    script = tmp_path / "client.py"
    script.write_text(
        "import signal, threading\nimport psutil\nfrom dispynb import LocalCluster\n"
        "ctrl_c = threading.Event()\n"
        "signal.signal(signal.SIGINT, lambda *_: ctrl_c.set())\n"
        "local = LocalCluster(cpus=1)\n"
        "print(' '.join(map(str, local.pids)), flush=True)\n"
        "assert ctrl_c.wait(60)\n"
        "print(all(psutil.Process(p).status() != 'zombie' for p in local.pids))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rest.strip() == "True"  # alive when the script handled its Ctrl-C
    assert wait_gone(pids, ORPHAN_WAIT) == []


def test_stop_while_the_run_submits_is_one_line_too(tmp_path):
    mark = tmp_path / "submitting"
    with kernel(tmp_path) as k:
        k.run_ok("%load_ext dispynb\n%dispy local --cpus 1")
        k.run_ok(
            "def inputs(mark):\n"
            "    import time\n"
            "    yield 1\n"
            "    open(mark, 'w').close()\n"
            "    time.sleep(60)  # Stop arrives here, inside Run.map's submit\n"
            "    yield 2\n"
        )
        msg_id = k.submit(
            f'%%dispy --over "inputs({str(mark)!r})" --into early\n'
            "def f(x):\n    return x\n"
        )
        wait_for(mark.exists)
        k.stop_button()
        out = k.collect(msg_id)
        assert out.ename == "RunInterrupted", out.text
        # What was sent (one job) is counted: Run.map says so.
        assert "Interrupted while submitting: run 'early' stopped" in out.text
        assert "of 1 jobs done)" in out.text
        assert "Traceback" not in out.text and "dispynb/" not in out.text, out.text
        # The run that sent it is kept, and says so (it did start).
        early = k.value("repr(early)")
        assert "stopped while submitting, 1 job submitted (Interrupted)" in early
        again = k.run_ok(
            '%%dispy --over "[3]" --into later\ndef g(x):\n    return -x\n'
        )
        assert k.value("later.results") == [-3], again.text


def test_stopped_run_map_keeps_what_finished_and_its_local_cluster(tmp_path):
    """``run = Run.map(...)`` stopped in a notebook: ``run`` is never assigned, so
    the results of the jobs that finished were lost (NameError, or an earlier
    cell's run). Now ``_dispy`` holds the run and the Stop line says so; the
    stopped jobs' processes are gone, and the notebook's own LocalCluster (not
    in the kernel's group) runs the next cell."""
    marks = tmp_path / "marks"
    marks.mkdir()
    with kernel(tmp_path) as k:
        k.run_ok("from dispynb import LocalCluster, Run\nlocal = LocalCluster(cpus=2)")
        k.run_ok(work(tmp_path))
        k.run_ok(
            "def quick_then_nap(mark, gate):\n"
            "    import os, time\n"
            "    if mark.endswith(('job0', 'job1')):\n"
            "        return mark[-4:]\n"
            "    with open(mark + '.tmp', 'w') as file:\n"
            "        file.write(str(os.getpid()))\n"
            "    os.replace(mark + '.tmp', mark)\n"
            f"    time.sleep({JOB_SECONDS})\n"
        )
        msg_id = k.submit(
            "run = Run.map(quick_then_nap, WORK, nodes=local, unpack=True)"
        )
        wait_for(lambda: len(list(marks.glob("job?"))) == 2)  # jobs 2 and 3 run
        workers = [int(mark.read_text()) for mark in marks.glob("job?")]
        k.stop_button()
        out = k.collect(msg_id, timeout=STOPPED_WITHIN)

        assert out.ename == "RunInterrupted", out.text
        assert "2 cancelled, 2 of them while running (2 of 4 jobs done)" in out.evalue
        assert out.evalue.endswith(
            "; _dispy holds the run (what finished: _dispy.results, _dispy.df)"
        ), out.evalue
        assert k.value("_dispy.results") == ["job0", "job1", None, None]
        assert k.value("list(_dispy.df.status)") == [
            "Finished", "Finished", "Terminated", "Terminated",
        ]  # fmt: skip
        assert k.value("'run' in globals()") is False
        assert wait_gone(workers, ORPHAN_WAIT) == []  # stopped, not left running
        assert k.value("Run.map(abs, [-1, -2], nodes=local).results") == [1, 2]


def test_stop_in_an_executor_map_stops_its_calls_and_ends_at_the_users_line(
    tmp_path,
):
    """Stop while ``list(executor.map(...))`` waits, as %%dispy and Run.map: the
    map's queued calls are cancelled and its running ones terminated (before,
    they ran on, out of reach, as the standard library leaves a pool's calls
    handed to its processes), and the traceback ends at the user's line with
    one frame of dispynb's (before: the map's, its wait's, the job's wait's).
    The executor runs the next cell's calls."""
    marks = tmp_path / "marks"
    marks.mkdir()
    with kernel(tmp_path) as k:
        k.run_ok(
            "from dispynb import Executor, LocalCluster\n"
            "local = LocalCluster(cpus=2)\n"
            "executor = Executor(nodes=local)"
        )
        k.run_ok(work(tmp_path))
        k.run_ok(
            "def nap(mark, gate):\n"
            "    import os, time\n"
            "    with open(mark + '.tmp', 'w') as file:\n"
            "        file.write(str(os.getpid()))\n"
            "    os.replace(mark + '.tmp', mark)\n"
            f"    time.sleep({JOB_SECONDS})\n"
        )
        msg_id = k.submit("values = list(executor.map(nap, *zip(*WORK)))")
        wait_for(lambda: len(list(marks.glob("job?"))) == 2)  # 2 run, 2 queued
        workers = [int(mark.read_text()) for mark in marks.glob("job?")]
        k.stop_button()
        out = k.collect(msg_id, timeout=STOPPED_WITHIN)

        assert out.ename == "KeyboardInterrupt", out.text
        shown = out.error_text
        assert "values = list(executor.map(" in shown, shown
        assert shown.count("dispynb/") <= 1 and "job.py" not in shown, shown
        assert wait_gone(workers, ORPHAN_WAIT) == []  # terminated, not left running
        assert k.value("executor.submit(abs, -3).result(30)") == 3
        assert len(list(marks.glob("job?"))) == 2  # the queued ones never ran
        k.run_ok("executor.shutdown(); local.close()")


#: A job that ignores SIGINT and SIGTERM, writes its pid to ``mark``, then waits
#: for a gate the test never opens.
DEAF_CELL = f"""%%dispy --over "[(MARK, GATE)]" --unpack --into deaf --progress html
def deaf(mark, gate):
    import os, signal, time
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(mark + ".tmp", "w").write(str(os.getpid()))
    os.replace(mark + ".tmp", mark)
    deadline = time.monotonic() + {JOB_SECONDS}
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.path.exists(gate)
"""


def test_stop_ends_a_job_that_ignores_signals_at_once(tmp_path):
    """A job that ignores SIGINT and SIGTERM, stopped as JupyterLab stops a cell
    (SIGINT to the kernel's process group): its node gave it 3 s to react to a
    KeyboardInterrupt it could never get, and the cell waited as long. Here the
    node gives a job 600 s (`node_with_graces`) and the kernel waits as
    long for the node to confirm (`runstop.CANCEL_WAIT`): were the job not killed
    at once, the cell could not return within `STOPPED_WITHIN`."""
    from tests.daemonhooks import node_with_graces
    from tests.nodeproc import start_node

    mark, gate = tmp_path / "deaf-started", tmp_path / "gate"
    node = start_node(tmp_path / "node", launcher=node_with_graces(cancel=600))
    try:
        with kernel(tmp_path) as k:
            k.run_ok(
                f"%load_ext dispynb\n%dispy nodes {node.spec} "
                f"--secret-file {node.secret_file}"
            )
            k.run_ok(
                f"MARK, GATE = {str(mark)!r}, {str(gate)!r}\n"
                "import dispynb.jupyter.runstop\n"
                "dispynb.jupyter.runstop.CANCEL_WAIT = 600"
            )
            msg_id = k.submit(DEAF_CELL)
            wait_for(mark.exists)
            job_pid = int(mark.read_text())
            pressed = time.monotonic()
            k.stop_button()
            out = k.collect(msg_id, timeout=STOPPED_WITHIN)
            returned = out.idle_at - pressed

            assert out.ename == "RunInterrupted", out.text
            assert out.evalue.endswith(
                "run 'deaf' stopped, 1 cancelled, 1 of them while running "
                "(0 of 1 jobs done)"
            ), out.evalue
            assert wait_gone([job_pid], 0) == []  # killed before the cell returned
            assert k.value("[j.status.name for j in deaf.jobs]") == ["Terminated"]
            again = k.run_ok(
                '%%dispy --over "range(3)" --into after\ndef sq(x):\n    return x * x\n'
            )
            assert k.value("after.results") == [0, 1, 4], again.text
    finally:
        assert node.stop() == 0, node.log_text()
    print(f"Stop: the cell returned {returned:.2f} s after SIGINT to its group")


#: A job that marks its start, catches the KeyboardInterrupt of a Stop, marks that
#: and carries on (a library that catches it to save its state, slowly).
STUBBORN_CELL = f"""%%dispy --over "[MARK]" --into stubborn --progress html
def stubborn(mark):
    import os, time
    open(mark, "w").close()
    try:
        time.sleep({JOB_SECONDS})
    except KeyboardInterrupt:
        open(mark + ".caught", "w").close()
        time.sleep({JOB_SECONDS})
    return mark
"""


def test_stop_pressed_twice_ends_a_job_that_outlasts_the_first(tmp_path):
    """Stop, then Stop again as the job carries on after its KeyboardInterrupt:
    the second press is to stop waiting, but the cell then waited as long in the
    close of the run's cluster (for the job the node gives 3 s, then kills).
    It closes at once: the node ends the job with the computation. Here the node
    gives a cancelled job 600 s and the kernel would wait as long in that close
    (`dispynb.cluster.TERMINATE_WAIT`): were it not closed at once, the cell
    could not return within `STOPPED_WITHIN`."""
    from tests.daemonhooks import node_with_graces
    from tests.nodeproc import start_node

    mark = tmp_path / "stubborn-started"
    node = start_node(tmp_path / "node", launcher=node_with_graces(cancel=600))
    try:
        with kernel(tmp_path) as k:
            k.run_ok(
                f"%load_ext dispynb\n%dispy nodes {node.spec} "
                f"--secret-file {node.secret_file}"
            )
            k.run_ok(
                f"MARK = {str(mark)!r}\n"
                "import dispynb.cluster\n"
                "dispynb.cluster.TERMINATE_WAIT = 600"
            )
            msg_id = k.submit(STUBBORN_CELL)
            wait_for(mark.exists)
            k.stop_button()
            wait_for(Path(f"{mark}.caught").exists)  # it carries on
            k.stop_button()
            out = k.collect(msg_id, timeout=STOPPED_WITHIN)

            assert out.ename == "RunInterrupted", out.text
            assert out.evalue.endswith(
                "run 'stubborn' stopped, 1 cancelled, 1 of them while running "
                "(0 of 1 jobs done)"
            ), out.evalue
            assert k.value("[j.status.name for j in stubborn.jobs]") == ["Terminated"]
            again = k.run_ok(
                '%%dispy --over "range(2)" --into after\ndef sq(x):\n    return x * x\n'
            )
            assert k.value("after.results") == [0, 1], again.text
    finally:
        assert node.stop() == 0, node.log_text()
