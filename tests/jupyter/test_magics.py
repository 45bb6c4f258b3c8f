"""``%%dispy`` cells on a real IPython shell with local nodes: a function over inputs
into a variable, what reaches the jobs, output, waiting, interrupts, timeouts and
failed jobs (what the magics refuse: `test_magics_usage.py`; the nodes a notebook
uses: `test_magics_session.py`)."""

from __future__ import annotations

import pytest
from IPython.utils.capture import capture_output

from dispynb.job import JobStatus
from dispynb.jupyter.errors import MagicError
from dispynb.jupyter.run import Run
from tests import jobs
from tests.jupyter.shell import cell
from tests.sigint import sigint_when

pytestmark = pytest.mark.slow

WAIT = jobs.WAIT


def test_a_comment_after_a_magic_line_is_ignored(ip):
    """As in the examples of ``%dispy?`` (``%dispy status   # nodes and runs``); a
    quoted ``#`` is no comment."""
    with capture_output():
        status = ip.run_line_magic("dispy", "status   # nodes and runs")
    assert "local nodes" in repr(status)
    cell(
        ip,
        "--over \"[len('#a')]\" --into commented   # one job",
        "def f(x):\n    return x + 1\n",
    )
    assert ip.user_ns["commented"].results == [3]


def test_magic_cell_runs_last_function_over_inputs_into_variable(ip):
    _, out, err = cell(
        ip,
        '--over "range(5)" --into squares',
        (
            "offset = 100\n"
            "def helper(x):\n    return x * x\n"
            "def compute(x):\n    return helper(x) + offset\n"
        ),
    )

    run = ip.user_ns["squares"]
    assert isinstance(run, Run)
    assert run is ip.user_ns["_dispy"]
    assert run.name == "squares"
    assert run.results == [100, 101, 104, 109, 116]
    assert list(run.df["status"]) == ["Finished"] * 5
    assert ip.user_ns["helper"](3) == 9  # the cell ran in the notebook too
    assert run.closed
    assert (out, err) == ("", "")


def test_magic_cell_named_function_expression_from_namespace_and_classes(ip):
    ip.user_ns["points"] = [(1, 2), (3, 4)]
    cell(
        ip,
        "norm --over points --unpack --into norms",
        (
            "class Vec:\n"
            "    def __init__(self, x, y):\n        self.x, self.y = x, y\n"
            "def norm(x, y):\n    v = Vec(x, y)\n    return v.x * v.x + v.y * v.y\n"
            "def unused(x):\n    return -1\n"
        ),
    )

    assert ip.user_ns["norms"].results == [5, 25]


def test_a_cached_function_of_the_notebook_reaches_the_jobs(ip):
    """A helper cached with functools.lru_cache (or cache) was pickled by its name
    (``__main__.fib``): the run could not start, 'cannot load computation ... Can't
    get attribute 'fib' on <module '__main__'>' and a hint to install a module on
    the nodes. It travels by value, as functions do, and is cached on the node."""
    ip.run_cell(
        "import functools\n"
        "@functools.lru_cache(maxsize=64)\n"
        "def fib(n):\n"
        "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    )
    cell(
        ip,
        '--over "[20, 30]" --into fibs',
        "@functools.cache\n"
        "def twice(n):\n"
        "    return 2 * fib(n), fib.cache_info().maxsize\n",
    )

    assert ip.user_ns["fibs"].results == [(13530, 64), (1664080, 64)]


def test_a_class_of_the_notebook_with_a_cached_property_reaches_the_jobs(ip):
    """On Python 3.11 a functools.cached_property holds a lock: a class of the
    notebook's with one could not be sent ('it uses Model.weights (class attribute
    of Model, a functools.cached_property), which cannot be pickled')."""
    ip.run_cell(
        "import functools\n"
        "class Model:\n"
        "    def __init__(self, scale):\n"
        "        self.scale = scale\n"
        "    @functools.cached_property\n"
        "    def weights(self):\n"
        "        return [self.scale, 2 * self.scale]\n"
    )
    cell(
        ip,
        '--over "[1, 10]" --into weighed',
        "def weigh(s):\n"
        "    m = Model(s)\n"
        "    return m.weights is m.weights, sum(m.weights), 'weights' in vars(m)\n",
    )

    assert ip.user_ns["weighed"].results == [(True, 3, True), (True, 30, True)]


def test_a_singledispatch_function_of_the_notebook_reaches_the_jobs(ip):
    """Its dispatch cache (a WeakKeyDictionary) could not be pickled: 'it uses
    dispatch_cache (closure variable of singledispatch.<locals>.dispatch ...)'."""
    ip.run_cell(
        "import functools\n"
        "class Square:\n"
        "    side = 3\n"
        "@functools.singledispatch\n"
        "def area(shape):\n"
        "    raise TypeError(shape)\n"
        "@area.register\n"
        "def _(shape: Square):\n"
        "    return shape.side ** 2\n"
        "@area.register(int)\n"
        "def _(shape):\n"
        "    return area(Square()) + shape\n"
    )
    cell(ip, '--over "[1, 2]" --into areas', "def measure(n):\n    return area(n)\n")

    assert ip.user_ns["areas"].results == [10, 11]


def test_magic_cell_setup_function_globals_reach_jobs(ip):
    ip.run_cell(
        "def load():\n    global table\n    table = {'a': 1, 'b': 2}\n    return 0\n"
    )

    cell(
        ip,
        "--over \"['a', 'b', 'z']\" --setup load --into looked",
        "def look(key):\n    return table.get(key, 0)\n",
    )

    assert ip.user_ns["looked"].results == [1, 2, 0]


def test_magic_cell_remote_output_and_traceback_appear_in_the_cell(ip):
    _, out, err = cell(
        ip,
        '--over "range(3)" --into noisy',
        (
            "import sys\n"
            "def noisy(x):\n"
            "    print(f'hello from job {x}')\n"
            "    print(f'warning {x}', file=sys.stderr)\n"
            "    if x == 2:\n        raise KeyError(x)\n"
            "    return x\n"
        ),
    )

    # Each printed line says which job printed it; run.df keeps the raw text.
    assert sorted(out.splitlines()) == sorted(
        f"[input {i}] hello from job {i}" for i in range(3)
    )
    assert {f"[input {i}] warning {i}" for i in range(3)} <= set(err.splitlines())
    assert "Traceback (most recent call last)" in err
    assert "KeyError: 2" in err
    # Which input failed, and the call it made: 'input 2' alone read as the value.
    job = ip.user_ns["noisy"].jobs[2]
    assert "input 2: noisy(2) on local-0 (" in err
    assert f") failed (job {job.id}):\n" in err
    assert ip.user_ns["noisy"].df.loc[0, "stdout"] == "hello from job 0\n"


def test_magic_cell_quiet_keeps_output_in_the_frame_only(ip):
    _, out, _ = cell(
        ip,
        '--over "[1]" --into hushed --quiet',
        "def talk(x):\n    print('psst')\n    return x\n",
    )

    assert "psst" not in out
    assert ip.user_ns["hushed"].df.loc[0, "stdout"] == "psst\n"


def test_magic_cell_nowait_returns_then_run_waits(ip, tmp_path):
    gate = tmp_path / "gate"
    ip.user_ns["gate_path"] = str(gate)

    cell(
        ip,
        '--over "range(3)" --into later --nowait',
        (
            "def later(x):\n"
            "    import os, time\n"
            "    while not os.path.exists(gate_path):\n        time.sleep(0.01)\n"
            "    return x\n"
        ),
    )

    run = ip.user_ns["later"]
    assert not run.done()  # the cell returned while the jobs wait for the gate
    gate.write_text("go")
    assert run.wait(timeout=WAIT)
    assert run.results == [0, 1, 2]
    assert run.closed


def test_magic_cell_interrupt_cancels_the_runs_remote_jobs(ip, tmp_path):
    started, finished = tmp_path / "started", tmp_path / "finished"
    ip.user_ns.pop("victim", None)
    ip.user_ns["work"] = [(str(started), 30, str(finished))] + [(None, 30, None)] * 3

    def ready() -> bool:
        run = ip.user_ns.get("victim")
        return started.exists() and run is not None and run._waiting

    # A real SIGINT, as the kernel's Stop button sends it (os.killpg).
    with (
        sigint_when(ready),
        capture_output() as captured,
        pytest.raises(KeyboardInterrupt),
    ):
        ip.run_cell_magic(
            "dispy",
            "--over work --unpack --into victim",
            (
                "def job(start, seconds, end):\n"
                "    import time\n"
                "    if start:\n        open(start, 'w').close()\n"
                "    time.sleep(seconds)\n"
                "    if end:\n        open(end, 'w').close()\n"
                "    return seconds\n"
            ),
        )

    run = ip.user_ns["victim"]
    statuses = [job.status for job in run.jobs]
    assert statuses[0] == JobStatus.Terminated
    assert set(statuses) <= {JobStatus.Terminated, JobStatus.Cancelled}
    assert run.closed
    assert not finished.exists()
    assert not run.failures  # stopped on purpose: cancelled, not failed
    assert run.counts().cancelled == 4
    assert "failed" not in captured.stderr


def test_magic_cell_timeout_cancels_unfinished_jobs(ip):
    _, _, err = cell(
        ip,
        '--over "[0, 30]" --into slow --timeout 0.5',
        "def nap(s):\n    import time\n    time.sleep(s)\n    return s\n",
    )

    run = ip.user_ns["slow"]
    assert [job.status for job in run.jobs] == [
        JobStatus.Finished,
        JobStatus.Terminated,
    ]
    assert (
        "Timed out after 0.5 s: run 'slow' stopped, 1 cancelled, 1 of them while "
        "running"
    ) in err


def test_magic_cell_timeout_before_any_result_fails_the_cell(ip):
    """Nothing finished within --timeout: nothing to go on with, so the cell fails
    (Run All stops there), as when every job failed; before, it ended 'ok' and the
    next cells ran on with ``None`` results."""
    ip.user_ns.pop("none", None)
    with capture_output() as captured, pytest.raises(MagicError) as raised:
        ip.run_cell_magic(
            "dispy",
            '--over "[30, 30]" --into none --timeout 0.5',
            "def nap(s):\n    import time\n    time.sleep(s)\n    return s\n",
        )
    # Said once, by the error: before, 'Timed out after 0.5 s: run 'none' stopped,
    # 2 cancelled, ...' came first, then the error saying it again.
    assert "Timed out" not in captured.stderr, captured.stderr
    assert str(raised.value) == (
        "no job of run 'none' finished within --timeout 0.5 s (2 cancelled): give "
        "it more seconds; none.df has the jobs"
    )
    run = ip.user_ns["none"]
    assert [job.status for job in run.jobs] == [JobStatus.Terminated] * 2
    assert not run.failures  # cancelled, not failed


def test_inputs_that_give_nothing_say_no_job_was_sent(ip):
    """A generator used up by an earlier cell (or an empty list) ran nothing and
    said nothing: 'gen: 0/0 done' read like a run that worked."""
    gen = (x for x in range(3))
    assert list(gen) == [0, 1, 2]  # an earlier cell used it up
    ip.user_ns["gen"] = gen
    _, _, err = cell(ip, '--over "gen" --into none', "def f(x):\n    return x\n")
    assert ip.user_ns["none"].results == []
    assert (
        "dispynb: --over 'gen' gave no inputs: no job was sent (an iterator, used "
        "up by an earlier run? make it again, or give a list)"
    ) in err, err
    _, _, err = cell(ip, '--over "[]" --into none', "def f(x):\n    return x\n")
    assert "dispynb: --over '[]' gave no inputs: no job was sent\n" in err, err


def test_magic_cell_error_in_cell_submits_nothing(ip):
    ip.user_ns.pop("broken", None)
    with capture_output(), pytest.raises(MagicError, match="no jobs were submitted"):
        ip.run_cell_magic(
            "dispy", '--over "[1]" --into broken', "def f(x):\n    return x\n1/0\n"
        )

    assert ip.user_ns["broken"].jobs == []
    assert "ZeroDivisionError" in repr(ip.user_ns["broken"])


def test_stop_while_submitting_keeps_the_run_saying_how_many_were_submitted(
    ip, tmp_path
):
    """Stop after 3 of the inputs were submitted (a real SIGINT while --over
    produces the fourth): the names hold that run, which says so, not "not
    started"; its 3 jobs were cancelled."""
    mark = tmp_path / "three"
    ip.user_ns.pop("cut", None)
    ip.user_ns["mark"] = str(mark)
    ip.run_cell(
        "def inputs():\n"
        "    import time\n"
        "    yield from (30, 30, 30)\n"
        "    open(mark, 'w').close()\n"
        "    time.sleep(60)\n"
        "    yield 30\n"
    )
    with (
        sigint_when(mark.exists),
        capture_output(),
        pytest.raises(KeyboardInterrupt, match="Interrupted while submitting"),
    ):
        ip.run_cell_magic(
            "dispy",
            '--over "inputs()" --into cut',
            "def nap(s):\n    import time\n    time.sleep(s)\n    return s\n",
        )

    run = ip.user_ns["cut"]
    assert run is ip.user_ns["_dispy"] and len(run.jobs) == 3
    assert all(job.done() for job in run.jobs) and run.counts().cancelled == 3
    text = repr(run)
    assert "not started" not in text, text
    assert "stopped while submitting, 3 jobs submitted (Interrupted): " in text, text
    assert "3 jobs submitted" in run._repr_html_()


def test_inputs_that_fail_midway_leave_a_run_saying_n_of_m_submitted(ip):
    ip.user_ns.pop("cut", None)
    ip.run_cell(
        "class Ten:\n"
        "    def __len__(self):\n        return 10\n"
        "    def __getitem__(self, i):\n"
        "        if i == 3:\n            raise ValueError('no 3')\n"
        "        return i\n"
    )
    with capture_output(), pytest.raises(ValueError, match="no 3"):
        ip.run_cell_magic(
            "dispy", '--over "Ten()" --into cut', "def f(x):\n    return x\n"
        )

    run = ip.user_ns["cut"]
    assert len(run.jobs) == 3
    text = repr(run)
    assert (
        "stopped while submitting, 3 of 10 jobs submitted (--over raised "
        "ValueError: no 3)" in text
    ), text


def test_magic_cell_whose_jobs_all_failed_fails_the_cell(ip):
    """Every job raised: the cell fails (Run All and a notebook run in CI stop
    there), after showing the remote traceback, and the run is kept to look at."""
    with capture_output() as captured, pytest.raises(MagicError) as raised:
        ip.run_cell_magic(
            "dispy",
            '--over "[1, 2, 3]" --into hopeless',
            "def inverse(x):\n    return 1 / (x - x)\n",
        )

    assert str(raised.value) == (
        "all 3 jobs of run 'hopeless' failed (ZeroDivisionError): the traceback "
        "is above; hopeless.failures has them"
    )
    assert "ZeroDivisionError: division by zero" in captured.stderr
    run = ip.user_ns["hopeless"]
    assert [job.status for job in run.jobs] == [JobStatus.Terminated] * 3
    assert len(run.failures) == 3


def test_jobs_that_failed_without_a_traceback_point_at_the_reason(ip):
    """A job whose worker died (os._exit) has no traceback: the cell's last line
    points at the reason shown above it, not at a traceback that is not there."""
    with capture_output() as captured, pytest.raises(MagicError) as raised:
        ip.run_cell_magic(
            "dispy",
            '--over "[1]" --into died',
            "def die(x):\n    import os\n    os._exit(1)\n",
        )

    assert str(raised.value).endswith(
        "failed (the job's worker process exited with status 1): the reason is "
        "above; died.failures has it"
    ), str(raised.value)
    assert "Traceback" not in captured.stderr + captured.stdout


def test_magic_cell_with_some_jobs_failed_succeeds(ip):
    """Some jobs failed: the cell shows them but succeeds (the others' results
    are there to use)."""
    _, _, err = cell(
        ip,
        '--over "[0, 1, 2]" --into partly',
        "def inverse(x):\n    return 1 / x\n",
    )

    assert "ZeroDivisionError" in err
    assert ip.user_ns["partly"].results[1:] == [1.0, 0.5]
