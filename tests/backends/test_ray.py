"""dispynb on a real Ray cluster (``ray start --head``), through dispy's API: jobs,
their outcomes and output, setup and cleanup, files, provisional results, the
Executor and the magics.

Runs only inside the private namespace of `test_ray_netns.py` (see conftest.py): one
Ray cluster for the run (conftest.py's ``head``), its address given to ``RayEngine``
as a user would.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

import dispynb
from dispynb import JobCluster
from dispynb.backends.ray import RayEngine
from dispynb.errors import NotSupportedError, SerializationError, SetupError
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


def progress(count: int) -> str:
    for index in range(count):
        dispy_provisional_result(index)  # noqa: F821 (dispy's name on the node)
    return "done"


def sends_file(name: str) -> int:
    with open(name, "w") as handle:
        handle.write(f"written by the job for {name}")
    return dispy_send_file(name)  # noqa: F821 (dispy's name on the node)


def sends_nested_then_flat(name: str) -> list[int]:
    os.makedirs("sub", exist_ok=True)
    with open("sub/out.txt", "w") as handle:
        handle.write("nested")
    refused = dispy_send_file("sub/out.txt")  # noqa: F821
    with open(name, "w") as handle:
        handle.write("flat")
    return [refused, dispy_send_file(name)]  # noqa: F821


def log_a_line(n: int) -> int:
    """Sets up logging as a script does, once per actor (its handler keeps the
    stderr it finds: that job's), and logs a line."""
    import logging

    root = logging.getLogger()
    if not getattr(root, "set_up_by_a_job", False):
        logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
        root.set_up_by_a_job = True  # type: ignore[attr-defined]
    logging.getLogger("job").info("job %d logs", n)
    return n


def leave_a_printer(n: int, marks: str) -> tuple[int, int, bool]:
    """The first job on an actor starts a thread and returns; the thread waits for
    a later job on its actor, then prints, tries to send a provisional result and
    notes what that returned. A later job prints, says it runs and returns once
    the note is there. Returns ``(n, pid, whether a later job)``."""
    import os
    import pathlib
    import threading
    import time

    here, pid = pathlib.Path(marks), os.getpid()

    def wait_for(name: str) -> None:
        deadline = time.monotonic() + 30
        while not (here / name).exists() and time.monotonic() < deadline:
            time.sleep(0.005)

    if not (here / f"printer-{pid}").exists():

        def late() -> None:
            wait_for(f"runs-{pid}")
            print(f"late out from a thread of job {n}")
            sent = dispy_provisional_result("late")  # noqa: F821
            (here / f"printed-{pid}.tmp").write_text(str(sent))
            os.rename(here / f"printed-{pid}.tmp", here / f"printed-{pid}")

        threading.Thread(target=late, daemon=True).start()
        (here / f"printer-{pid}").touch()
        print(f"job {n} out")
        return n, pid, False
    print(f"job {n} out")
    (here / f"runs-{pid}").touch()
    wait_for(f"printed-{pid}")
    return n, pid, True


def reads_file(name: str) -> str:
    return Path(name).read_text()


def digest(value: Any) -> tuple[str, str, Any]:
    """``value``'s type, the SHA-256 of its bytes (of every buffer in it, in order),
    and ``value`` itself back (a large result)."""
    import hashlib

    return type(value).__name__, hashlib.sha256(flat_bytes(value)).hexdigest(), value


def flat_bytes(value: Any) -> bytes:
    if isinstance(value, list | tuple):
        return b"".join(flat_bytes(item) for item in value)
    if isinstance(value, dict):
        return b"".join(flat_bytes(value[key]) for key in sorted(value))
    return bytes(memoryview(value).cast("B"))


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


def test_depends_files_are_next_to_the_jobs(engine: RayEngine, tmp_path: Path) -> None:
    data = tmp_path / "input.txt"
    data.write_text("the data")
    with JobCluster(reads_file, depends=[str(data)], engine=engine) as cluster:
        job = cluster.submit("input.txt")
        assert job() == "the data", job.exception


def reports_on_file(name: str) -> int:
    """Reads a ``depends`` file, sends its text as a provisional result and a copy
    of it as a file."""
    text = Path(name).read_text()
    dispy_provisional_result(text)  # noqa: F821 (dispy's name on the node)
    Path(f"copy-{name}").write_text(text)
    return dispy_send_file(f"copy-{name}")  # noqa: F821


def test_a_cluster_with_depends_files_gets_its_jobs_messages(
    engine: RayEngine, tmp_path: Path
) -> None:
    """With ``depends`` files, a job's provisional results and files still reach
    the client (before, the actor kept the last file it wrote instead of the
    inbox: every message was lost, ``dispy_send_file`` returned -1)."""
    data = tmp_path / "input.txt"
    data.write_text("the data")
    received = tmp_path / "received"
    received.mkdir()
    provisional: list[Any] = []

    def job_status(job: DispyJob) -> None:
        if job.status == JobStatus.ProvisionalResult:
            provisional.append(job.result)

    with JobCluster(
        reports_on_file,
        depends=[str(data)],
        job_status=job_status,
        files_dir=str(received),
        engine=engine,
    ) as cluster:
        job = cluster.submit("input.txt")
        assert job() == 0, (job.exception, job.stderr)
    assert provisional == ["the data"]
    assert (received / "copy-input.txt").read_text() == "the data"


def test_dispy_send_file_saves_the_file_under_files_dir(
    engine: RayEngine, tmp_path: Path
) -> None:
    """A file a job sends is saved at its relative path under ``files_dir`` before
    the job's result arrives."""
    received = tmp_path / "received"
    received.mkdir()
    with JobCluster(sends_file, engine=engine, files_dir=str(received)) as cluster:
        job = cluster.submit("report.txt")
        assert job() == 0, job.exception
        assert (received / "report.txt").read_text() == (
            "written by the job for report.txt"
        )


def test_dispy_send_file_returns_0_only_once_the_client_wrote_it(
    engine: RayEngine, tmp_path: Path
) -> None:
    """The client answers each file a job sends, as dispynb's nodes relay it: -1
    (and why, on the job's stderr) for a file it cannot write (its ``sub`` is a
    file), 0 once written (before: 0 for both)."""
    received = tmp_path / "received"
    received.mkdir()
    (received / "sub").write_text("a file where the job's folder should be")
    with JobCluster(
        sends_nested_then_flat, engine=engine, files_dir=str(received)
    ) as cluster:
        job = cluster.submit("flat.txt")
        assert job() == [-1, 0], (job.exception, job.stderr)
    assert "'sub/out.txt' not sent" in job.stderr, job.stderr
    assert "is not a directory" in job.stderr, job.stderr
    assert (received / "flat.txt").read_text() == "flat"


def test_provisional_results_arrive_in_order_before_the_result(
    engine: RayEngine,
) -> None:
    seen: list[tuple[JobStatus, Any]] = []
    lock = threading.Lock()

    def job_status(job: DispyJob) -> None:
        with lock:
            seen.append((job.status, job.result))

    with JobCluster(progress, job_status=job_status, engine=engine) as cluster:
        job = cluster.submit(5)
        assert job() == "done"
        wait_for(lambda: len(seen) == 6, "the callbacks")
    assert seen == [
        *((JobStatus.ProvisionalResult, n) for n in range(5)),
        (JobStatus.Finished, "done"),
    ]


def test_clusters_of_one_engine_share_its_inbox_and_keep_their_own_messages(
    head: RayHead,
) -> None:
    """Two clusters open at once on one engine (one CPU each of the head's two): one
    inbox actor for both (no worker process of its own per cluster), and each gets
    only its own jobs' provisional results, in order; a cluster opened after one
    closed gets its own too."""
    engine = RayEngine(head.address, cpus=1)
    seen: dict[str, list[Any]] = {"a": [], "b": [], "c": []}
    lock = threading.Lock()

    def recorder(name: str) -> Any:
        def job_status(job: DispyJob) -> None:
            if job.status == JobStatus.ProvisionalResult:
                with lock:
                    seen[name].append(job.result)

        return job_status

    with (
        JobCluster(progress, job_status=recorder("a"), engine=engine) as first,
        JobCluster(progress, job_status=recorder("b"), engine=engine) as second,
    ):
        backends: list[Any] = [first._backend, second._backend]
        assert backends[0]._inbox is backends[1]._inbox
        jobs = [first.submit(30), second.submit(20), first.submit(3)]
        assert [job() for job in jobs] == ["done"] * 3
        wait_for(lambda: len(seen["a"]) == 33 and len(seen["b"]) == 20, "the results")
    assert sorted(seen["a"]) == sorted([*range(30), *range(3)])
    assert seen["b"] == list(range(20))
    with JobCluster(progress, job_status=recorder("c"), engine=engine) as third:
        assert third.submit(4)() == "done"
        wait_for(lambda: len(seen["c"]) == 4, "the third cluster's results")
    assert seen["c"] == list(range(4))


def test_engine_close_ends_its_inbox_and_a_later_cluster_gets_a_new_one(
    engine: RayEngine,
) -> None:
    """``RayEngine.close()`` (``%dispy close``) ends the engine's inbox actor; a
    cluster opened on the engine afterwards has a new one, and its provisional
    results arrive."""
    import ray

    with JobCluster(progress, engine=engine) as cluster:
        assert cluster.submit(2)() == "done"
        backend: Any = cluster._backend
        inbox = backend._inbox
    engine.close()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(inbox.take.remote("any", 0.01), timeout=WAIT)
    seen: list[Any] = []

    def job_status(job: DispyJob) -> None:
        if job.status == JobStatus.ProvisionalResult:
            seen.append(job.result)

    with JobCluster(progress, job_status=job_status, engine=engine) as cluster:
        backend = cluster._backend
        assert backend._inbox is not inbox
        assert cluster.submit(3)() == "done"
        wait_for(lambda: len(seen) == 3, "the provisional results")
    assert seen == [0, 1, 2]
    engine.close()


def test_large_arguments_and_results_of_several_types_arrive_intact(
    engine: RayEngine,
) -> None:
    """Arguments of megabytes (Ray's object store) of the usual buffer types, alone
    and nested in containers, reach the job whole and come back as its result."""
    numpy = pytest.importorskip("numpy")
    size = 3_000_000
    raw = os.urandom(size)
    array = numpy.frombuffer(os.urandom(size), dtype=numpy.float64)
    values: list[Any] = [
        raw,
        bytearray(raw[::-1]),
        array,
        [raw[:100], bytearray(os.urandom(size)), {"x": raw[1:], "y": array[:10]}],
        (b"small", raw, array.reshape(-1, 5)),
    ]
    with JobCluster(digest, engine=engine) as cluster:
        jobs = [cluster.submit(value) for value in values]
        replies = [job() for job in jobs]
    for value, job, reply in zip(values, jobs, replies, strict=True):
        assert job.status == JobStatus.Finished, job.exception
        kind, checksum, back = reply
        assert kind == type(value).__name__
        assert checksum == hashlib.sha256(flat_bytes(value)).hexdigest()
        assert flat_bytes(back) == flat_bytes(value)
        assert type(back) is type(value)


class CountsPickles:
    """A result that comes back as ``{"times": how many times it was pickled}``."""

    pickled = 0  # in the process that made it

    def __init__(self) -> None:
        self.made_at = type(self).pickled

    def __reduce__(self) -> tuple[Any, ...]:
        type(self).pickled += 1
        return (dict, ([("times", type(self).pickled - self.made_at)],))


class LoadsNowhere:
    """A result that pickles, whose pickle cannot be loaded."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (int, ("not a number",))


def returns_counted(kind: str) -> Any:
    print("returning", kind)
    if kind == "bad":
        return LoadsNowhere()
    return {"counted": CountsPickles()}


def test_a_result_is_pickled_once_and_one_that_cannot_be_loaded_says_so(
    engine: RayEngine,
) -> None:
    """The actor pickles a result (to say what in it cannot be pickled): Ray carries
    those bytes, not the result pickled once more (before, twice: a result of
    millions of objects cost twice the time), alone or in a batch. A result whose
    pickle cannot be loaded here ends Terminated in the words of dispynb's nodes,
    with the job's output."""
    with JobCluster(returns_counted, engine=engine) as cluster:
        job = cluster.submit("one")
        assert job()["counted"] == {"times": 1}, job.exception
        jobs = [cluster.submit("many") for _ in range(200)]
        wait_for(lambda: all(job.done() for job in jobs), "the 200 jobs")
        backend: Any = cluster._backend
        assert backend._batches_sent > 0, "no batch was sent"
        assert {job.result["counted"]["times"] for job in jobs} == {1}
        bad = cluster.submit("bad")
        assert bad() is None
    assert bad.status is JobStatus.Terminated
    assert bad.stdout == "returning bad\n"
    assert bad.exception.startswith("the result cannot be unpickled here: "), (
        bad.exception
    )
    assert "ValueError: invalid literal for int()" in bad.exception, bad.exception


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


def total(values: Any) -> int:
    return sum(values)


def test_ray_put_handles_are_jobs_arguments_as_put_says(engine: RayEngine) -> None:
    """``put`` is refused on Ray saying to pass ``ray.put``'s handle as an
    argument instead: doing so gives the job the object."""
    import ray

    with JobCluster(total, engine=engine) as cluster:
        with pytest.raises(NotSupportedError, match=r"ray\.put\(obj\)"):
            cluster.put([1, 2, 3])
        job = cluster.submit(ray.put(list(range(100))))
        assert job() == 4950, job.exception
        # A keyword too, as f.remote(values=ref) (the job got the handle).
        job = cluster.submit(values=ray.put(list(range(10))))
        assert job() == 45, job.exception


def first_kind(values: Any) -> str:
    return type(values[0]).__name__


def test_an_executor_calls_ray_put_handles_are_objects_as_in_a_ray_task(
    engine: RayEngine,
) -> None:
    """As ``f.remote(ref)`` and ``f.remote(values=ref)``: a call's ObjectRef
    argument reaches it as the object; one inside a list stays a handle (as
    Ray's). The call got the handle itself, not as a Ray user expects."""
    import ray

    ref = ray.put(list(range(100)))
    with dispynb.Executor(engine=engine) as executor:
        assert executor.submit(total, ref).result(timeout=WAIT) == 4950
        assert executor.submit(total, values=ref).result(timeout=WAIT) == 4950
        assert list(executor.map(total, [[1, 2], ref, [3]], chunksize=3)) == [
            3,
            4950,
            3,
        ]
        kind = executor.submit(first_kind, [ref]).result(timeout=WAIT)
        assert kind == "ObjectRef"


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


#: A new program (its own Ray driver) that opens two clusters on the Ray cluster at
#: argv[1], one after the other, and runs a job on each.
TWO_CLUSTERS = """
import sys
import dispynb
from dispynb.backends.ray import RayEngine

engine = RayEngine(sys.argv[1])
for n in (3, 4):
    with dispynb.JobCluster(abs, engine=engine) as cluster:
        print(cluster.submit(-n)())
engine.close()
"""


@pytest.mark.timeout(300)
def test_opening_clusters_logs_no_ray_error_about_actor_arguments(
    head: RayHead,
) -> None:
    """A program that opens clusters on Ray printed an error line of Ray's, "E ...
    core_worker.cc: Actor with class name: 'JobActor' ... has constructor arguments
    in the object store and max_restarts > 0 ..." (Ray warns that a restarted actor
    may find them gone; dispynb keeps them for the cluster's life)."""
    root = Path(__file__).resolve().parents[2]
    env = {**head.env, "PYTHONPATH": str(root), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", TWO_CLUSTERS, head.address],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3", "4"], proc.stdout
    assert "constructor arguments in the object store" not in proc.stderr, proc.stderr


def test_a_log_handler_set_up_by_an_earlier_job_logs_into_each_jobs_stderr(
    engine: RayEngine,
) -> None:
    """The first job on each actor calls ``logging.basicConfig()``: its handler
    kept that job's stderr, so the lines the later jobs on that actor logged were
    lost. Now each job's stderr holds its own (as on dispynb's nodes,
    tests/nodeserver/test_thread_output.py). Six jobs one after the other on the
    cluster's two CPUs: at least four follow another on their actor."""
    with JobCluster(log_a_line, engine=engine) as cluster:
        jobs = []
        for n in range(6):
            job = cluster.submit(n)
            assert job() == n, (job.status, job.exception)
            jobs.append(job)
    assert [job.stderr for job in jobs] == [f"job {n} logs\n" for n in range(6)]


def test_a_thread_of_a_job_that_returned_prints_and_sends_nothing_as_a_later_job(
    engine: RayEngine, tmp_path: Path
) -> None:
    """A thread the first job on an actor left running prints while a later job
    runs on that actor: its line was in that job's stdout, and its provisional
    result was sent as that job's. Now, as on dispynb's nodes
    (tests/nodeserver/test_thread_output.py), the line goes to the actor's own
    stdout and the send is refused (-1)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    seen: list[tuple[JobStatus, Any]] = []
    lock = threading.Lock()

    def job_status(job: DispyJob) -> None:
        with lock:
            seen.append((job.status, job.result))

    jobs = []
    with JobCluster(leave_a_printer, job_status=job_status, engine=engine) as cluster:
        for n in range(6):  # two actors: a third job at the latest follows another
            job = cluster.submit(n, str(marks))
            outcome = job()
            assert outcome is not None, (job.status, job.exception)
            jobs.append(job)
            if outcome[2]:
                break
        else:
            raise AssertionError(f"no job followed another on its actor: {jobs}")
        wait_for(lambda: len(seen) >= len(jobs), "the callbacks")
    assert [job.stdout for job in jobs] == [f"job {n} out\n" for n in range(len(jobs))]
    assert (marks / f"printed-{outcome[1]}").read_text() == "-1"
    assert {status for status, _ in seen} == {JobStatus.Finished}


def prints_a_lot(megabytes: int) -> int:
    """Prints ``megabytes`` MiB in 1 MiB lines; the KiB its worker's peak resident
    memory grew by meanwhile."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    line = "x" * (2**20 - 9)
    for n in range(megabytes):
        print(f"{n:08d}{line}")  # a new string each (not one kept many times)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before


def test_a_job_printing_more_than_max_output_size_is_not_held_whole(
    engine: RayEngine,
) -> None:
    """A job prints 256 MiB with max_output_size=1000: its actor keeps the first
    1000 characters and counts the rest, as dispynb's nodes and the Dask runner do;
    the job's stdout says how many were dropped. Before, the actor held all of it
    until the job ended (its memory grew by 256 MiB and more), then cut it."""
    with JobCluster(prints_a_lot, max_output_size=1000, engine=engine) as cluster:
        job = cluster.submit(256)
        grown = job()
        assert job.status is JobStatus.Finished, job.exception
    assert grown < 64 * 1024, f"the worker grew by {grown} KiB"
    assert job.stdout == "00000000" + "x" * 992 + "\n" + (
        f"[dispynb: {256 * 2**20 - 1000} more characters of stdout dropped: a job "
        "keeps 1000 (max_output_size)]\n"
    )
