"""``%dispy`` and ``%%dispy`` on a real IPython shell with local nodes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

from dispynb.job import JobStatus
from dispynb.jupyter.errors import MagicError
from dispynb.jupyter.magics import DispyMagics
from dispynb.jupyter.run import Run
from tests import jobs
from tests.nodeproc import running_node
from tests.sigint import sigint_when
from tests.transport.certs import make_cert

pytestmark = pytest.mark.slow

WAIT = jobs.WAIT


@pytest.fixture(scope="module")
def ip() -> Iterator[InteractiveShell]:
    """A shell with ``%load_ext dispynb`` and one local node with 2 CPUs."""
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "dispynb")
    with capture_output() as captured:
        shell.run_line_magic("dispy", "local --cpus 2")
    assert captured.stdout.startswith("dispynb: local nodes 127.0.0.1:")
    yield shell
    shell.run_line_magic("dispy", "close")
    shell.run_line_magic("unload_ext", "dispynb")


def cell(ip: InteractiveShell, line: str, body: str) -> tuple[object, str, str]:
    """Run ``%%dispy line`` over ``body``; return (result, stdout, stderr)."""
    with capture_output() as captured:
        result = ip.run_cell_magic("dispy", line, body)
    return result, captured.stdout, captured.stderr


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
    ids = [job.id for job in ip.user_ns["noisy"].jobs]
    assert sorted(out.splitlines()) == sorted(
        f"[job {ids[i]}] hello from job {i}" for i in range(3)
    )
    assert {f"[job {ids[i]}] warning {i}" for i in range(3)} <= set(err.splitlines())
    assert "Traceback (most recent call last)" in err
    assert "KeyError: 2" in err
    assert "(input 2)" in err
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


@pytest.mark.parametrize(
    ("line", "body", "message"),
    [
        ('--over "[1]"', "x = 1\n", "defines no function"),
        ('--over "[1]" --into 1x', "def f(x):\n    return x\n", "variable name"),
        ('nothing --over "[1]"', "def f(x):\n    return x\n", "'nothing' is not"),
        ("", "def f(x):\n    return x\n", "--over"),
        ('--over "[1]" --progress fancy', "def f(x):\n    return x\n", "invalid"),
        # Each job failed: 'result of type 'coroutine' cannot be pickled ... (a
        # list, not a generator ...)' and "coroutine 'f' was never awaited".
        (
            '--over "[1]"',
            "async def f(x):\n    return x\n",
            r"^f is an async def function: .* \(return asyncio.run\(main\(x\)\)\)$",
        ),
        ('--over "[1]"', "def f(x):\n    yield x\n", "^f yields: each job would"),
        # Ran the cell, sent the job and cancelled it: "no job finished within
        # --timeout -5 s (1 cancelled): give it more seconds".
        ('--over "[1]" --timeout -5', "def f(x):\n    return x\n", "above 0, not -5"),
        ('--over "[1]" --timeout 0', "def f(x):\n    return x\n", "above 0, not 0 "),
    ],
)
def test_magic_cell_usage_errors(ip, line, body, message):
    with pytest.raises(UsageError, match=message):
        ip.run_cell_magic("dispy", line, body)


def test_a_function_of_an_earlier_cell_runs_from_a_dispy_line(ip):
    """``%%dispy outer --over ...`` with nothing under it: IPython refused it ('the
    cell body is empty. Did you mean the line magic %dispy?') and %dispy then
    said "invalid choice: 'outer'". The line now runs it as that cell would."""
    ip.run_cell("def twice(x):\n    return 2 * x\n")
    with capture_output() as captured:
        ip.run_line_magic("dispy", "twice --over 'range(3)' --into doubled")
    assert ip.user_ns["doubled"].results == [0, 2, 4], captured.stderr
    assert ip.user_ns["_dispy"] is ip.user_ns["doubled"]
    # A typo said "unknown option --over; did you mean --nodes?".
    with pytest.raises(UsageError) as raised:
        ip.run_line_magic("dispy", "twise --over 'range(3)'")
    assert str(raised.value).startswith(
        "%dispy twise: 'twise' is neither one of local, nodes, "
    ), raised.value
    assert str(raised.value).endswith("; did you mean twice? (see %dispy?)")


@pytest.mark.parametrize(
    ("into", "message"),
    [
        ("print", "--into print would hide Python's built-in function print in"),
        ("len", "--into len would hide Python's built-in function len in"),
        ("class", "--into needs a variable name, not 'class'"),
        ("Out", "--into Out would replace IPython's Out in this notebook"),
    ],
)
def test_into_a_name_python_or_ipython_gives_is_refused(ip, into, message):
    """``--into print`` made ``print`` the run: ``print(1)`` in the next cells
    waited for the run and returned True, printing nothing. Refused before the
    cell's code runs, with nothing sent and nothing assigned."""
    before = ip.user_ns.get(into, "absent")
    ip.user_ns.pop("ran_the_body", None)
    with pytest.raises(UsageError) as raised:
        ip.run_cell_magic(
            "dispy",
            f'--over "[1]" --into {into}',
            "ran_the_body = 1\ndef f(x):\n    return x\n",
        )
    assert str(raised.value).startswith(message), raised.value
    assert "choose another name" in str(raised.value) or into == "class"
    assert ip.user_ns.get(into, "absent") is before
    assert "ran_the_body" not in ip.user_ns
    with capture_output() as captured:
        ip.run_cell("print('still printing')")
    assert captured.stdout == "still printing\n"


@pytest.mark.parametrize(
    ("depends", "message"),
    [
        ("['missing.csv']", "--depends[0]: 'missing.csv' is not a file (a relative "),
        ("[__file__, 5]", "--depends[1]: 5 is not a dependency; give files"),
    ],
)
def test_a_depends_mistake_is_said_before_the_run_starts(ip, depends, message):
    """It failed as the run's cluster started, with how to start nodes ("start
    nodes on this machine with %dispy local, ...") though the nodes were fine."""
    ip.user_ns["__file__"] = __file__
    cell(ip, '--over "[1]" --into typo', "def f(x):\n    return x\n")
    earlier = ip.user_ns["typo"]
    with pytest.raises(UsageError) as raised:
        ip.run_cell_magic(
            "dispy",
            f'--over "[1]" --into typo --depends "{depends}"',
            "def f(x):\n    return x\n",
        )
    said = str(raised.value)
    assert said.startswith(message), said
    assert "%dispy" not in said, said
    assert ip.user_ns["typo"] is not earlier  # the name says what happened
    assert earlier.results == [1]


def test_a_misspelt_progress_in_the_environment_is_one_line(ip, monkeypatch):
    """``DISPYNB_PROGRESS=htm``: was ignored; now a usage error, not a traceback
    through Run.map and make_progress, and nothing is sent."""
    monkeypatch.setenv("DISPYNB_PROGRESS", "htm")
    with pytest.raises(UsageError) as raised:
        ip.run_cell_magic(
            "dispy", '--over "[1]" --into typo', "def f(x):\n    return x"
        )
    assert str(raised.value) == (
        "DISPYNB_PROGRESS='htm': use one of auto, widget, html, text or none "
        "(or unset it)"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("bogus", "'bogus' is neither one of local, nodes"),
        # Was: "the following arguments are required: action, HOST[:PORT]".
        ("", "^%dispy needs what to do: local, nodes, .* panel or close"),
        ("  # a comment", "^%dispy needs what to do"),
        ("nodes", "at least one"),
        ("status extra", "takes no hosts"),
        ("local --cpus 0", "at least 1"),
        ("local --adapt 0:2", "--adapt is for %dispy ssh and slurm"),
        ("ssh h1 --adapt 2", "--adapt takes MIN:MAX"),
        ("ssh h1 --adapt 3:2", "0 <= MIN <= MAX"),
        ("slurm --adapt 0:0", "MAX >= 1"),
        ("ssh h1 --adapt a:b", "not 'a:b'"),
        ("ssh h1 --adapt 0:2 --idle-timeout -1", "--idle-timeout must be"),
    ],
)
def test_magic_line_usage_errors(ip, line, message):
    with pytest.raises(UsageError, match=message):
        ip.run_line_magic("dispy", line)


@pytest.mark.parametrize("given", ["--secret s3cr3t-xyz", "--secret=s3cr3t-xyz"])
def test_a_secret_on_the_magic_line_is_refused_never_echoed(ip, given):
    """dispy users pass ``secret=``: ``%dispy nodes HOST --secret VALUE`` was taken
    as ``--secret-file`` (an abbreviation) and the error quoted the secret, saved
    with the notebook ("secret file 's3cr3t-xyz' does not exist")."""
    with pytest.raises(UsageError) as raised:
        ip.run_line_magic("dispy", f"nodes 127.0.0.1:9 {given}")
    message = str(raised.value)
    assert "s3cr3t" not in message, message
    assert message.startswith(
        "--secret: a secret on the magic line would be saved with the notebook"
    ), message
    assert "--secret-file" in message and "DISPYNB_SECRET" in message, message


def test_a_bad_secret_file_is_said_in_one_line_without_the_nodes_hint(ip, tmp_path):
    """The file is the notebook's problem, not the nodes': before, the error went on
    'check that dispynb-node runs there with the same secret (and TLS options), or
    start nodes here with %dispy local'."""
    missing = tmp_path / "nope"
    with pytest.raises(UsageError) as raised:
        ip.run_line_magic("dispy", f"nodes 127.0.0.1:9 --secret-file {missing}")
    assert str(raised.value) == (
        f"--secret-file: secret file '{missing}' does not exist: create it (mode "
        "600) or fix the path"
    )
    loose = tmp_path / "loose"
    loose.write_text("a-secret-of-the-lab-0123456789\n")
    loose.chmod(0o644)
    with pytest.raises(UsageError, match=f"restrict it with: chmod 600 {loose}$"):
        ip.run_line_magic("dispy", f"nodes 127.0.0.1:9 --secret-file {loose}")
    assert "local nodes" in repr(ip.run_line_magic("dispy", "status"))  # kept


def test_a_local_node_that_died_says_to_run_dispy_local_again():
    """The news of a %dispy local node that exited (a warning in the cell) said
    'start a new LocalCluster (an Executor without nodes starts its own)', a
    program's fix, not the notebook's."""
    import os
    import signal

    from dispynb.jupyter import session

    local = session._local_nodes(2, 1)  # as %dispy local --nodes 2 --cpus 1
    try:
        os.kill(local.pids[1], signal.SIGKILL)
        host, port = local.addresses[1]
        jobs.wait_until(lambda: local.exit_reason(host, port) is not None)
        reason = local.exit_reason(host, port)
        assert reason.endswith(
            "has exited (killed by SIGKILL): its jobs cannot run there any more; "
            "run %dispy local again for new nodes"
        ), reason
    finally:
        local.close()


def test_a_cell_runs_on_the_local_nodes_left_when_one_exited(ip):
    """One of two %dispy local nodes killed (the out-of-memory killer): the next
    cell runs on the other, saying which exited and how to get it back, as a dispy
    cluster goes on with the nodes it has. It stopped, saying 'no job was sent',
    while %dispy status listed the other node as idle. ``--on`` the exited node
    says so."""
    import os
    import signal

    from dispynb.jupyter.session import Session

    magics = ip.magics_manager.registry[DispyMagics.__name__]
    kept, magics.session = magics.session, Session()
    try:
        with capture_output():
            ip.run_line_magic("dispy", "local --nodes 2 --cpus 1")
        local = magics.session.local
        os.kill(local.pids[1], signal.SIGKILL)
        jobs.wait_until(lambda: local.exited() != [])
        _, _, err = cell(
            ip, '--over "range(4)" --into survived', "def where(x):\n    return x\n"
        )
        host, port = local.addresses[1]
        assert (
            f"dispynb: 1 of the 2 local nodes has exited: {host}:{port} (status -9); "
            "running on the other 1: run %dispy local again for new nodes"
        ) in err, err
        run = ip.user_ns["survived"]
        assert run.results == [0, 1, 2, 3], run.df
        assert list(run.df["status"]) == ["Finished"] * 4
        with pytest.raises(UsageError, match=f"node {host}:{port} .*has exited"):
            cell(ip, f'--over "[1]" --on {host}:{port}', "def f(x):\n    return x\n")
    finally:
        magics.session.close()
        magics.session = kept


def test_a_launched_node_that_exited_leaves_the_cell_the_others():
    """One of two launched nodes (%dispy ssh, %dispy slurm) ended: a launcher's
    addresses are those still running, so the cell said 'the nodes have exited',
    with one running. It runs on the other, saying so. The panel marks the one
    that ended gone, as it does a local node (its ``exited()`` item said ``name:
    why``, no address: no row of its own)."""
    import os
    import signal

    from dispynb.jupyter.session import Session
    from tests.deploy.test_launcher import LocalProcesses

    session = Session()
    launcher = LocalProcesses()
    session.local = session.nodes = launcher
    try:
        launcher.start(2)
        launcher.wait_for(2, timeout=30)
        dead = launcher._launched[0]
        assert dead.handle is not None and dead.node is not None
        os.kill(dead.handle.pid, signal.SIGKILL)
        jobs.wait_until(lambda: launcher.exited() != [])
        address = f"{dead.node.host}:{dead.node.port}"
        assert session.exited_nodes() == {address}
        gone = [row for row in session.rows() if row.address == address]
        assert [row.gone for row in gone] == [True], session.rows()
        assert session.exited_error() is None
        news = session.exited_news()
        assert news.startswith(f"1 of the 2 {launcher.kind} nodes has exited: "), news
        assert "; running on the other 1: " in news, news
        run = Run.map(abs, [-1, -2, -3], nodes=session.nodes, progress="none")
        assert run.results == [1, 2, 3], run.df
    finally:
        session.close()


def test_dispy_status_lists_a_local_node_that_exited_before_the_probe_met_it():
    """A %dispy local node killed as the nodes start, before the session's probe
    reached it, is listed gone in %dispy status (the where-line names it): it was
    left out, as if there were one node fewer."""
    import os
    import signal

    from dispynb.jupyter import session as sessions
    from dispynb.jupyter.session import Session

    def start() -> object:  # as %dispy local --nodes 2, one killed at once
        local = sessions._local_nodes(2, 1)
        os.kill(local.pids[1], signal.SIGKILL)
        jobs.wait_until(lambda: local.exited() != [])
        return local

    session = Session()
    try:
        session._start_then_replace(start, {}, "%dispy local", hint="")
        host, port = session.local.addresses[1]
        text = repr(session.status())
    finally:
        session.close()
    assert f"  local-1 {host}:{port} gone cpus=0" in text, text
    assert "local-0 " in text and " idle " in text, text


def test_a_finished_run_a_variable_holds_stays_in_status_after_new_nodes():
    """As the guide says: a finished run stays in %dispy status as long as a
    variable holds it. New nodes (%dispy local again) dropped every run from it.
    (A session of its own: this module's shell keeps its nodes.)"""
    from dispynb.jupyter.session import Session

    session = Session()
    try:
        session.start_local(1, 1)
        kept = Run.map(abs, [-1, -2], nodes=session.nodes, progress="none")
        session.add_run(kept)
        session.start_local(1, 1)  # %dispy local again: new nodes
        assert session.runs == [kept], session.runs
        assert "<Run 'abs' 2/2 done" in repr(session.status())
    finally:
        session.close()


def test_magic_line_status_lists_nodes_and_runs(ip):
    cell(ip, '--over "[1, 2]" --into counted', "def one(x):\n    return 1\n")

    status = ip.run_line_magic("dispy", "status")

    text = repr(status)
    assert text.startswith("local nodes 127.0.0.1:")
    assert "local-0" in text
    assert "<Run 'counted' 2/2 done" in text
    html = status._repr_html_()
    assert "local-0" in html and "counted" in html


def test_magic_line_nodes_attaches_with_secret_file(ip, tmp_path):
    magics = ip.magics_manager.registry[DispyMagics.__name__]
    local = magics.session.local
    secret = tmp_path / "secret"
    secret.write_text(local.secret)
    secret.chmod(0o600)
    spec = local.node_specs()[0]
    try:
        magics.session.local = None  # keep the local node: attach to it by address
        with capture_output() as captured:
            ip.run_line_magic("dispy", f"nodes {spec} --secret-file {secret}")
        assert captured.stdout == f"dispynb: nodes {spec}\n"
        cell(ip, '--over "[3]" --into remote', "def triple(x):\n    return 3 * x\n")
        assert ip.user_ns["remote"].results == [9]
    finally:
        magics.session.local = local
        magics.session.nodes = local


def test_nodes_without_a_secret_say_how_a_notebook_gives_it(ip, tmp_path):
    """The node's answer names secret= and DISPYNB_SECRET, a program's ways, and
    the magic's hint only 'the same secret': it now says how the line gives it,
    --secret-file FILE."""
    with (
        running_node(tmp_path, secret="a-node-secret-0123456789abcdef") as node,
        pytest.raises(MagicError) as raised,
    ):
        ip.run_line_magic("dispy", f"nodes 127.0.0.1:{node.port}")
    message = str(raised.value)
    assert (
        "\ncheck that dispynb-node runs there with the same secret (a copy of its "
        "file, given with --secret-file FILE) and TLS options, or start nodes "
        "here with %dispy local\n"
    ) in message, message
    assert message.endswith("still in use: local nodes " + local_spec(ip)), message


def local_spec(ip: InteractiveShell) -> str:
    return ip.magics_manager.registry[DispyMagics.__name__].session.local.node_specs()[
        0
    ]


@pytest.mark.slow
def test_magic_line_nodes_attaches_over_tls(ip, tmp_path):
    magics = ip.magics_manager.registry[DispyMagics.__name__]
    local, nodes = magics.session.local, magics.session.nodes
    cert, key = make_cert(tmp_path)
    with running_node(tmp_path / "node", "--certfile", cert, "--keyfile", key) as node:
        try:
            magics.session.local = None  # keep the local node for the other tests
            ip.run_line_magic(
                "dispy",
                f"nodes {node.spec} --secret-file {node.secret_file} --cafile {cert}",
            )
            cell(
                ip, '--over "[4]" --into tls_run', "def square(x):\n    return x * x\n"
            )
            assert ip.user_ns["tls_run"].results == [16]
        finally:
            magics.session.local, magics.session.nodes = local, nodes
    assert "with TLS" in node.log_text()


def test_magic_help_documents_every_option(ip):
    cell_doc = ip.find_cell_magic("dispy").__doc__
    line_doc = ip.find_line_magic("dispy").__doc__

    for option in (
        "--over",
        "--into",
        "--nowait",
        "--unpack",
        "--setup",
        "--progress",
        "--quiet",
        "--timeout",
        "--depends",
        "--on",
        "--reentrant",
        "function",
    ):
        assert option in cell_doc, option
    for option in (
        "local",
        "nodes",
        "status",
        "panel",
        "close",
        "--nodes",
        "--cpus",
        "--secret-file",
        "--cafile",
        "--certfile",
        "--keyfile",
        "--pulse",
    ):
        assert option in line_doc, option
