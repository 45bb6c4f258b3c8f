"""dispynb on a real Ray cluster (``ray start --head``), through dispy's API: jobs,
their outcomes, setup and cleanup, the Executor and the magics (files and
provisional results: `test_ray_messages.py`; arguments and results:
`test_ray_data.py`; the jobs' output: `test_ray_output.py`).

Runs only inside the private namespace of `test_ray_netns.py` (see conftest.py): one
Ray cluster for the run (conftest.py's ``head``), its address given to ``RayEngine``
as a user would.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

import dispynb
from dispynb import JobCluster
from dispynb.backends.ray import RayEngine
from dispynb.errors import (
    ConfigurationError,
    NotSupportedError,
    SerializationError,
    SetupError,
)
from dispynb.job import DispyJob, JobStatus
from tests.backends.rayhead import RayHead
from tests.backends.raywork import (
    WAIT,
    record_cleanup,
    record_setup,
    uses_setup,
    wait_for,
)

#: Ray's driver keeps its connections to the actors' workers (its cache).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.usefixtures("allow_engine_sockets"),
]


# -- computations (by value, as from a notebook) ------------------------------------


def compute(n: int) -> int:
    print(f"computing {n}")
    print("to stderr", file=sys.stderr)
    return n * n


def fails(n: int) -> int:
    raise ValueError(f"bad input {n}")


def area(width, height):  # no annotations: its signature is in the text asserted
    return width * height


def keeps_a_lock(n: int) -> Any:
    print("made it")
    return {"n": n, "guard": threading.Lock()}


#: What dispynb's nodes say of ``keeps_a_lock``'s result (the same on every engine).
UNPICKLABLE_LOCK = (
    "result of type 'dict' cannot be pickled; result['guard'] is a 'lock' that "
    "cannot be pickled: TypeError: cannot pickle '_thread.lock' object; return what "
    "it is made from instead (a list, not a generator; a file's path, not the open "
    "file)\n"
)


# -- tests ----------------------------------------------------------------------------


def test_dispy_program_runs_on_ray(
    engine: RayEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dispy program as written, with engine= added: results, stdout, stderr,
    callbacks, statuses, the node, print_status (Ray does not count each worker's
    bytes: "-" for Sent and Rcvd, not "0 B")."""
    statuses: list[tuple[int, Any]] = []
    done: list[DispyJob] = []

    def cluster_status(status: int, node: Any, job: Any) -> None:
        statuses.append((status, node))

    cluster = JobCluster(
        compute,
        job_status=done.append,
        cluster_status=cluster_status,
        engine=engine,
    )
    try:
        jobs = [cluster.submit(n) for n in range(10)]
        assert [job() for job in jobs] == [n * n for n in range(10)]
        cluster.wait()
        capsys.readouterr()
        cluster.print_status()
        table = capsys.readouterr().out
    finally:
        cluster.close()
    rows = table.split("-\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(rows) == 1 and rows[0].endswith(" |       - |       -"), table
    for n, job in enumerate(jobs):
        assert job.status is JobStatus.Finished
        assert job.stdout == f"computing {n}\n"
        assert job.stderr == "to stderr\n"
        assert job.ip_addr == "127.0.0.1"
        assert job.start_time is not None and job.end_time >= job.start_time
    wait_for(lambda: len(done) == 10, "the job_status callbacks")
    assert {job.status for job in done} == {JobStatus.Finished}
    nodes = [
        node for status, node in statuses if status == dispynb.DispyNode.Initialized
    ]
    assert len(nodes) == 1 and nodes[0].ip_addr == "127.0.0.1" and nodes[0].cpus == 2


def test_remote_traceback(engine: RayEngine) -> None:
    with JobCluster(fails, engine=engine) as cluster:
        job = cluster.submit(7)
        assert job() is None
    assert job.status is JobStatus.Terminated
    assert "ValueError: bad input 7" in job.exception
    assert "in fails" in job.exception  # the remote frame, not the engine's


def test_a_job_submitted_with_the_wrong_arguments_shows_the_call(
    engine: RayEngine,
) -> None:
    """``submit(3)`` for ``area(width, height)``: the job's error shows the call and
    the function's parameters, as on dispynb's nodes (Ray's actor gave Python's
    message alone); the job with the right arguments is unaffected."""
    with JobCluster(area, engine=engine) as cluster:
        good, bad = cluster.submit(3, 4), cluster.submit(3)
        assert good() == 12, good.exception
        assert bad() is None
    assert bad.status is JobStatus.Terminated
    assert bad.exception == (
        "TypeError: area() missing 1 required positional argument: 'height'\n"
        "(the job called area(3); area takes (width, height): give submit() the "
        "function's arguments)\n"
    ), bad.exception


def test_a_result_that_cannot_be_pickled_says_why(engine: RayEngine) -> None:
    """A job whose result cannot be pickled ends Terminated with its output and the
    words dispynb's nodes use: the part of the result that cannot be pickled and
    what to return instead, whether it ran alone in its Ray call or in a batch of
    short jobs. Alone, the user saw Ray's "could not send the result back or load
    its arguments on the worker" and lost the job's output; in a batch, "the job's
    result cannot be sent back: cannot pickle object of type 'dict'"."""
    with JobCluster(keeps_a_lock, engine=engine) as cluster:
        job = cluster.submit(1)
        assert job() is None
        assert job.status is JobStatus.Terminated
        assert (job.stdout, job.exception) == ("made it\n", UNPICKLABLE_LOCK)
        for n, short in [(n, cluster.submit(n)) for n in range(2, 40)]:
            short()  # jobs of microseconds: the next ones go in batches
            assert short.exception == UNPICKLABLE_LOCK, (n, short.exception)
        jobs = [cluster.submit(n) for n in range(100)]
        wait_for(lambda: all(job.done() for job in jobs), "the 100 jobs")
        backend: Any = cluster._backend
        assert backend._batches_sent > 0, "no batch was sent"
    for batched in jobs:
        assert batched.status is JobStatus.Terminated
        assert (batched.stdout, batched.exception) == ("made it\n", UNPICKLABLE_LOCK)


def test_an_argument_that_cannot_be_pickled_is_named_as_on_dispynb_nodes(
    engine: RayEngine,
) -> None:
    """submit() refuses an argument that cannot be pickled, naming it from 1 and
    saying what to send instead, in the words of dispynb's nodes (it said
    "argument 0 of the job cannot be sent to Ray: ...", no way out)."""
    with (
        JobCluster(compute, engine=engine) as cluster,
        pytest.raises(SerializationError) as raised,
    ):
        cluster.submit(threading.Lock())
    message = str(raised.value)
    assert message.startswith(
        "job argument 1 cannot be sent to a Ray worker: cannot pickle object of "
        "type 'lock' ("
    ), message
    assert message.endswith(
        "TypeError: cannot pickle '_thread.lock' object; send what it is made from "
        "instead (a file's path, not the open file; a list, not a generator) and "
        "make it in the job"
    ), message


def test_setup_and_cleanup_run_once_per_worker(
    engine: RayEngine, tmp_path: Path
) -> None:
    """setup runs in each Ray worker (actor) before its jobs, its globals reach the
    jobs; cleanup runs in each when the cluster closes."""
    folder = str(tmp_path)
    cluster = JobCluster(
        uses_setup,
        setup=lambda: record_setup(folder),
        cleanup=lambda: record_cleanup(folder),
        engine=engine,
    )
    try:
        results = [job() for job in [cluster.submit(n) for n in range(20)]]
    finally:
        cluster.close()
    setups = sorted(p.name.split("-")[1] for p in tmp_path.glob("setup-*"))
    cleanups = sorted(p.name.split("-")[1] for p in tmp_path.glob("cleanup-*"))
    assert len(setups) == 2 and setups == cleanups
    assert [n for n, _ in results] == list(range(20))
    assert {state for _, state in results} <= {f"set up in {pid}" for pid in setups}


def test_a_failing_cleanup_is_logged_with_this_files_lines(
    engine: RayEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning showed the actor's <dynamic-code> frames (a cleanup defined
    in a notebook or a function travels by value)."""

    def cleanup_fails() -> None:
        raise OSError("the scratch disk is gone")

    with (
        caplog.at_level(logging.WARNING, logger="dispynb.backends.ray"),
        JobCluster(compute, cleanup=cleanup_fails, engine=engine) as cluster,
    ):
        assert cluster.submit(3)() == 9
    failed = [
        r.getMessage() for r in caplog.records if "cleanup failed" in r.getMessage()
    ]
    assert failed, caplog.text
    line = cleanup_fails.__code__.co_firstlineno + 1
    assert f'File "{__file__}", line {line}, in cleanup_fails' in failed[0], failed
    assert "<dynamic-code>" not in failed[0], failed


def test_setup_failure_is_one_clear_error(engine: RayEngine) -> None:
    """A setup that raises, or returns what is not success, is one SetupError that
    says so in the words of dispynb's nodes (before, Ray's text came first: "The
    actor died because of an error raised in its creation task", terminal
    colours, the actor's frames and carets, with the reason at the end of them).
    Setup's traceback is the error's ``remote_traceback``, whole, as from a node
    (before, none: Ray splices its own lines into a message of several lines)."""

    def connect(where: str) -> None:
        raise RuntimeError(f"no database {where}\ncheck the address")

    def broken_setup() -> int:
        connect("here")
        return 0

    def refusing_setup() -> int:
        return 5

    with pytest.raises(SetupError) as raised:
        JobCluster(compute, setup=broken_setup, engine=engine)
    assert str(raised.value) == (
        "the computation could not be set up on the Ray cluster: setup raised "
        "RuntimeError: no database here\ncheck the address"
    )
    shown = raised.value.remote_traceback
    assert shown.startswith("Traceback (most recent call last):\n"), shown
    assert "in broken_setup\n" in shown and "in connect\n" in shown, shown
    assert shown.endswith("RuntimeError: no database here\ncheck the address\n")
    assert "ray::" not in shown and "_rayworker" not in shown, shown
    notes = "".join(getattr(raised.value, "__notes__", []))
    assert "The node's traceback:" in notes and "in connect" in notes, notes
    with pytest.raises(SetupError) as raised:
        JobCluster(compute, setup=refusing_setup, engine=engine)
    assert str(raised.value) == (
        "the computation could not be set up on the Ray cluster: setup returned 5; "
        "success is None, 0, 1 or 2"
    )


def test_executor_on_ray(engine: RayEngine) -> None:
    with dispynb.Executor(engine=engine) as executor:
        assert list(executor.map(compute, range(8))) == [n * n for n in range(8)]
        future = executor.submit(fails, 3)
        with pytest.raises(Exception, match="bad input 3"):
            future.result(timeout=WAIT)


async def twice(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


def say_in_init(word: str) -> None:
    warnings.warn(f"init {word}", stacklevel=1)


def test_executor_on_ray_runs_async_functions_and_shows_its_initializers_warnings(
    engine: RayEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    """As on dispynb's nodes: an async def function's coroutine runs to its end,
    and the initializer's warning is written here with the first call of each
    actor, naming this file and line."""
    line = say_in_init.__code__.co_firstlineno + 1
    with dispynb.Executor(
        engine=engine, initializer=say_in_init, initargs=("ray",)
    ) as executor:
        assert executor.submit(twice, 4).result(timeout=WAIT) == 8
        assert list(executor.map(twice, range(4))) == [0, 2, 4, 6]
    err = capsys.readouterr().err
    assert f"{__file__}:{line}: UserWarning: init ray\n" in err, err
    assert "<dynamic-code>" not in err, err


def test_what_ray_cannot_do_is_one_clear_error(engine: RayEngine) -> None:
    with pytest.raises(NotSupportedError, match="'ray'"):
        JobCluster("/bin/echo", engine=engine)
    with pytest.raises(NotSupportedError, match="recover_file"):
        JobCluster(compute, recover_file="jobs.db", engine=engine)
    with (
        JobCluster(compute, engine=engine) as cluster,
        pytest.raises(NotSupportedError, match="send_file"),
    ):
        cluster.send_file(__file__, "127.0.0.1")


def test_magics_run_a_cell_on_ray(head: RayHead) -> None:
    """``%dispy ray ADDRESS`` then ``%%dispy``: results, the cell's remote stdout."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "dispynb")
    try:
        with capture_output() as attached:
            shell.run_line_magic("dispy", f"ray {head.address}")
        assert "ray engine" in attached.stdout, attached.stdout
        cell = "def square(x):\n    print('squaring', x)\n    return x * x\n"
        with capture_output() as ran:
            shell.run_cell_magic("dispy", '--over "range(4)" --into squares', cell)
        assert shell.user_ns["squares"].results == [0, 1, 4, 9]
        assert "squaring 3" in ran.stdout, ran.stdout
    finally:
        with capture_output():
            shell.run_line_magic("dispy", "close")
        shell.run_line_magic("unload_ext", "dispynb")
        InteractiveShell.clear_instance()


def test_dispy_ray_at_another_address_is_refused_and_keeps_the_cluster_in_use(
    head: RayHead,
) -> None:
    """``%dispy ray A`` then ``%dispy ray B``: this process is connected to A (Ray
    keeps one connection per process), so B was never checked: the magic said it
    used B and dropped A, its jobs then running on A anyway. It refuses B, saying
    so and how to switch, and keeps A in use."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output
    from traitlets.config import Config

    from dispynb.jupyter.errors import MagicError
    from tests.backends.rayhead import free_port

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "dispynb")
    other = f"127.0.0.1:{free_port()}"  # no Ray head there
    try:
        with capture_output():
            shell.run_line_magic("dispy", f"ray {head.address}")
        with capture_output(), pytest.raises(MagicError) as raised:
            shell.run_line_magic("dispy", f"ray {other}")
        message = str(raised.value)
        assert f"connected to the Ray cluster at {head.address}" in message, message
        assert "%dispy close" in message and "ray.shutdown()" in message, message
        assert f"still in use: ray engine: {head.address}" in message, message
        status = repr(shell.run_line_magic("dispy", "status"))
        assert f"ray engine: {head.address}" in status, status
        with capture_output():
            shell.run_cell_magic(
                "dispy",
                '--over "range(3)" --into squares',
                "def sq(x):\n    return x * x\n",
            )
        assert shell.user_ns["squares"].results == [0, 1, 4]
        # The plain API says the same.
        with pytest.raises(ConfigurationError, match=f"at {head.address}"):
            JobCluster(compute, engine=RayEngine(other))
    finally:
        with capture_output():
            shell.run_line_magic("dispy", "close")
        shell.run_line_magic("unload_ext", "dispynb")
        InteractiveShell.clear_instance()
