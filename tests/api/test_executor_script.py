"""`dispynb.Executor` in a user's script, run as a terminal runs it: Ctrl-C (SIGINT
to the script's whole process group) while ``map`` runs ends the script promptly
and leaves no node or worker process behind, as ``ProcessPoolExecutor`` does; an
executor left open ends quietly with the script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from tests.jobs import WAIT, wait_for_path
from tests.sigint import python_handles_sigint, run_in_session

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SCRIPT = textwrap.dedent(
    """
    import sys
    import time
    from pathlib import Path

    from dispynb import Executor


    def mark_and_sleep(path):
        Path(path).touch()
        time.sleep(300)


    if __name__ == "__main__":
        where = sys.argv[1]
        with Executor(max_workers=2) as executor:
            # Quick calls first: the node then sends calls ahead to busy workers.
            assert sorted(executor.map(abs, range(-20, 0))) == list(range(1, 21))
            for _ in executor.map(mark_and_sleep, [f"{where}/{i}" for i in range(8)]):
                pass
    """
)

#: Far less than the calls' 300 s, far more than closing local nodes takes.
PROMPTLY = 60.0


def test_ctrl_c_during_map_ends_the_script_and_its_processes(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # As a terminal starts it: Python's SIGINT handler (a background job, as CI's
    # test run, would pass SIGINT ignored on to the script, which then ignores it).
    with python_handles_sigint():
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # its own process group, as a terminal's job
        )
    try:
        for i in range(2):
            wait_for_path(tmp_path / str(i), timeout=60)
        below = psutil.Process(proc.pid).children(recursive=True)
        assert below  # the local nodes and their workers
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=PROMPTLY)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    assert err.rstrip().endswith("KeyboardInterrupt"), err
    _gone, alive = psutil.wait_procs(below, timeout=WAIT)
    assert alive == []


LEFT_OPEN = textwrap.dedent(
    """
    from dispynb import Executor

    if __name__ == "__main__":
        with Executor(max_workers=1) as executor:
            assert executor.submit(abs, -1).result() == 1
        executor = Executor(max_workers=1)  # never shut down
        print(executor.submit(abs, -3).result())
    """
)


def test_an_executor_left_open_ends_quietly_with_the_script(tmp_path: Path) -> None:
    """Its cluster closes at exit before its local nodes stop: before, the nodes
    went first and the script ended on a warning per node ("node ... left")."""
    script = tmp_path / "script.py"
    script.write_text(LEFT_OPEN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=PROMPTLY,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "3\n", "")


#: A notebook's cell running ``executor.map``; Stop (JupyterLab's SIGINT to the
#: kernel's process group) lands as ``cluster.submit`` has returned the third job,
#: before ``map`` has it. Then: how every job the map submitted ended.
STOP_AFTER_SUBMIT = textwrap.dedent(
    """
    import json, os, signal, time
    from dispynb import Executor, LocalCluster

    def nap(x):
        time.sleep(300)
        return x

    submitted = []
    with LocalCluster(cpus=1) as local:
        executor = Executor(nodes=local)
        submit = executor.cluster.submit

        def submit_then_stop(*args, **kwargs):
            job = submit(*args, **kwargs)
            submitted.append(job)
            if len(submitted) == 3:
                os.killpg(os.getpgrp(), signal.SIGINT)
                time.sleep(60)  # the handler raises here, the job not returned
            return job

        executor.cluster.submit = submit_then_stop
        interrupted = False
        try:
            list(executor.map(nap, range(6)))
        except KeyboardInterrupt:
            interrupted = True
        end = time.monotonic() + 20
        for job in submitted:
            job.wait(max(end - time.monotonic(), 0))
        statuses = [job.status.name for job in submitted]
        executor.cluster._cancel_all(submitted)  # what the map left running
        executor.shutdown()
    print(json.dumps({"interrupted": interrupted, "statuses": statuses}))
    """
)


def test_stop_as_a_maps_submit_returns_leaves_none_of_its_jobs_running() -> None:
    """The job whose submit had just returned was not yet the map's: the map
    stopped the others, and that one ran on (for 300 s here)."""
    proc = run_in_session(STOP_AFTER_SUBMIT, timeout=90)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["interrupted"], proc.stderr[-2000:]
    statuses = report["statuses"]
    assert len(statuses) == 3, report
    assert set(statuses) <= {"Cancelled", "Terminated"}, report


#: A notebook's cell calling ``executor.submit`` twice; Stop (SIGINT to the
#: kernel's process group) lands in the second ``submit`` as the cluster's submit
#: has returned its job, or as its future has been made: either way before the
#: cell has the future. Then: how the two jobs are.
STOP_IN_SUBMIT = textwrap.dedent(
    """
    import json, os, signal, time
    from dispynb import Executor, LocalCluster
    from dispynb.job import DispyJob

    def nap(x):
        time.sleep(300)
        return x

    jobs = []

    def stop():
        os.killpg(os.getpgrp(), signal.SIGINT)
        time.sleep(60)  # the handler raises here

    with LocalCluster(cpus=2) as local:
        executor = Executor(nodes=local)
        first = executor.submit(nap, 1)  # the cell's: it runs on
        end = time.monotonic() + 30
        while not first.running() and time.monotonic() < end:
            time.sleep(0.05)  # then the second call gets the other CPU
        submit, attach = executor.cluster.submit, DispyJob._attach

        def submit_then_stop(*args, **kwargs):
            jobs.append(submit(*args, **kwargs))
            stop()

        def attach_then_stop(job, make):
            jobs.append(job)
            attach(job, make)
            stop()

        if WHERE == "cluster.submit":
            executor.cluster.submit = submit_then_stop
        else:
            DispyJob._attach = attach_then_stop
        interrupted = False
        try:
            executor.submit(nap, 2)
        except KeyboardInterrupt:
            interrupted = True
        (second,) = jobs
        second.wait(20)
        statuses = [first.job.status.name, second.status.name]
        executor.cluster._cancel_all([first.job, second])
        executor.shutdown()
    print(json.dumps({"interrupted": interrupted, "statuses": statuses}))
    """
)


@pytest.mark.parametrize("where", ["cluster.submit", "future made"])
def test_stop_in_submit_before_the_future_is_returned_stops_that_call(
    where: str,
) -> None:
    """The call was submitted but the cell never got its future (nothing to
    cancel it with): it ran on (300 s here). The cell's other call runs on."""
    proc = run_in_session(f"WHERE = {where!r}\n" + STOP_IN_SUBMIT, timeout=90)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["interrupted"], proc.stderr[-2000:]
    first, second = report["statuses"]
    assert first == "Running", report
    assert second in {"Cancelled", "Terminated"}, report


#: ``ProcessPoolExecutor``'s idiom for per-worker state: the initializer sets a
#: global of the script, the calls read it (here also one the script never
#: defines, read by a helper the call goes through).
INITIALIZER_GLOBALS = textwrap.dedent(
    """
    import json
    from dispynb import Executor

    factor = 1


    def init(value):
        global factor, table
        factor = value
        table = {"offset": 100}


    def offset():
        return table["offset"]


    def scaled(x):
        return factor * x + offset()


    if __name__ == "__main__":
        with Executor(max_workers=2, initializer=init, initargs=(10,)) as executor:
            print(json.dumps([list(executor.map(scaled, range(4))), factor]))
    """
)


def test_calls_see_the_globals_the_initializer_set(tmp_path: Path) -> None:
    """The calls read what the initializer set in the script's globals, as a
    ``ProcessPoolExecutor`` worker's calls do; before, a call's function came
    with globals of its own: ``factor`` was the script's 1, ``table`` undefined."""
    script = tmp_path / "script.py"
    script.write_text(INITIALIZER_GLOBALS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=PROMPTLY,
    )
    assert done.returncode == 0, done.stderr
    # The script's own globals are its own, as with the pool's worker processes.
    assert json.loads(done.stdout) == [[100, 110, 120, 130], 1]


#: An initializer and a call that both reach the same ``warnings.warn`` line.
WARNING_IN_BOTH = textwrap.dedent(
    """
    import warnings
    from dispynb import Executor


    def check(value):
        if value < 0:
            warnings.warn("negative value")
        return value


    def init():
        check(-1)


    if __name__ == "__main__":
        with Executor(max_workers=1, initializer=init) as executor:
            print(executor.submit(check, -2).result())
    """
)


def test_a_calls_warning_shows_where_the_initializer_warned_alike(
    tmp_path: Path,
) -> None:
    """The initializer's globals the calls get are the user's, not Python's: with
    its ``__warningregistry__`` too, the call's warning at the line where the
    initializer had warned was dropped as already shown."""
    script = tmp_path / "script.py"
    script.write_text(WARNING_IN_BOTH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=PROMPTLY,
    )
    assert (done.returncode, done.stdout) == (0, "-2\n"), done.stderr
    # The initializer's, then the call's.
    assert done.stderr.count("UserWarning: negative value") == 2, done.stderr
