"""The Dask engine on a real ``distributed.LocalCluster`` (worker processes).

Each test runs a client program inside a namespace host made by the test (the
LocalCluster's scheduler and workers live there too, on its loopback): dispy's API
with ``engine=DaskEngine(...)``, as users write it. What the program saw comes back
as JSON; process checks (is the stopped job's process gone?) are made from here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from dispynb.job import JobStatus
from tests.multihost.netns import Network, run_client, unavailable_reason

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(120)]

pytest.importorskip("distributed")

CREATED, RUNNING = int(JobStatus.Created), int(JobStatus.Running)
CANCELLED, TERMINATED = int(JobStatus.Cancelled), int(JobStatus.Terminated)
FINISHED = int(JobStatus.Finished)


@pytest.fixture(scope="module")
def net() -> Iterator[Network]:
    """One namespace host: the client program and its LocalCluster run there."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Network(1).running() as network:
        yield network


def run(net: Network, tmp_path: Path, code: str, **args: Any) -> Any:
    """Run a client program (``main(args)``) in the namespace host; its result."""
    return run_client(net, net.hosts[0], tmp_path, PRELUDE + code, args, timeout=100)


PRELUDE = """
import logging
import os
import sys
import time

import dispynb
import dispynb.errors
from distributed import LocalCluster
from dispynb.backends.dask import DaskEngine

logging.getLogger("distributed").setLevel(logging.ERROR)


def local_cluster(workers=2):
    return LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True,
        host="127.0.0.1", dashboard_address=None, silence_logs=logging.ERROR,
    )
"""


DISPY_PROGRAM = """
OUT = None


def setup():
    global offset
    offset = 100
    dispynode_logger.info("set up")  # dispy's names for setup and cleanup too
    return 0


def cleanup():
    with open(os.path.join(OUT, f"cleanup-{os.getpid()}"), "w") as handle:
        handle.write(f"{offset} {dispynode_shutdown()}")


def helper(x):
    return x * 2


def compute(n):
    with open("scale.txt") as handle:  # a depends file, in the job's directory
        assert handle.read() == "2"
    print("computing", n)
    print("warning", n, file=sys.stderr)
    dispy_provisional_result(("half-way", n))
    if n == 3:
        raise ValueError(f"bad input {n}")
    return helper(n) + offset


def main(args):
    import contextlib
    import io

    global OUT
    OUT = args["out"]
    statuses, provisional = [], []

    def job_status(job):
        if job.status == dispynb.DispyJob.ProvisionalResult:
            provisional.append(job.result)

    def cluster_status(status, node, job):
        if job is not None:
            statuses.append([job.id, int(status)])

    data = os.path.join(OUT, "scale.txt")
    with open(data, "w") as handle:
        handle.write("2")
    with local_cluster() as dask_cluster:
        engine = DaskEngine(dask_cluster)
        with dispynb.JobCluster(
            compute, engine=engine, setup=setup, cleanup=cleanup,
            depends=[helper, data],
            job_status=job_status, cluster_status=cluster_status,
        ) as cluster:
            jobs = [cluster.submit_job_id(n, n) for n in range(5)]
            cluster.wait()
            nodes = sorted(node.ip_addr for node in cluster.status().nodes)
            table = io.StringIO()
            with contextlib.redirect_stdout(table):
                cluster.print_status()
            sent = sum(node.tx for node in cluster.status().nodes)
            received = sum(node.rx for node in cluster.status().nodes)
        # What the client pickled for the jobs, and what came back as text alone.
        from dispynb.protocol import serialize

        arguments = sum(len(b) for n in range(5) for b in serialize.dumps(((n,), {})))
        output = sum(len(j.stdout) + len(j.stderr) for j in jobs)
        return {
            "jobs": [
                [j.id, int(j.status), j.result, j.stdout, j.stderr, j.exception,
                 j.ip_addr, j.start_time is not None and j.end_time >= j.start_time]
                for j in jobs
            ],
            "statuses": statuses,
            "provisional": sorted(map(list, provisional)),
            "nodes": nodes,
            "print_status": table.getvalue(),
            "traffic": [sent, received, arguments, output],
        }
"""


def test_a_dispy_program_runs_unchanged_on_dask(net: Network, tmp_path: Path) -> None:
    """setup's globals, depends (a function and a file), results, stdout/stderr, the
    remote traceback, provisional results and every status reach the program;
    cleanup runs once on each worker at close. dispy's ``dispynode_logger`` and
    ``dispynode_shutdown`` (-1: a Dask worker is not dispynb's to stop) are there
    as on a node (a NameError before)."""
    out = run(net, tmp_path, DISPY_PROGRAM, out=str(tmp_path))
    by_id = {job[0]: job for job in out["jobs"]}
    for n in (0, 1, 2, 4):
        _, status, result, stdout, stderr, exception, ip, timed = by_id[n]
        assert (status, result, exception) == (FINISHED, 2 * n + 100, None)
        assert stdout == f"computing {n}\n" and stderr == f"warning {n}\n"
        assert ip == "127.0.0.1" and timed
    _, status, result, stdout, _, exception, _, _ = by_id[3]
    assert status == TERMINATED and result is None and stdout == "computing 3\n"
    assert "ValueError: bad input 3" in exception
    assert ", in compute\n" in exception  # the job's own frame (cell-mapped in Jupyter)
    assert "_daskhost" not in exception  # not the runner's
    assert out["provisional"] == [["half-way", n] for n in range(5)]
    for n in range(5):
        seen = [status for job_id, status in out["statuses"] if job_id == n]
        assert seen[:2] == [CREATED, RUNNING]
        assert seen[-1] == (TERMINATED if n == 3 else FINISHED)
    assert out["nodes"] == ["127.0.0.1", "127.0.0.1"]
    # dispy's table, with the bytes of the jobs' arguments sent and of their
    # results and output received (print_status showed 0 B).
    rows = out["print_status"].split("-\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(rows) == 2, out["print_status"]
    sent, received, arguments, output = out["traffic"]
    assert sent == arguments and received > output, out["traffic"]
    assert all(row.endswith((" B", " K")) for row in rows), rows  # counted: no "-"
    assert "|    Sent |    Rcvd" in out["print_status"]  # dispy's heading
    cleanups = list(tmp_path.glob("cleanup-*"))
    assert len(cleanups) == 2 and all(p.read_text() == "100 -1" for p in cleanups)


FAILING_CALLS_PROGRAM = """
def area(width, height):
    return width * height


def eats_memory(megabytes):
    if not megabytes:  # the address space the runner has now
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    return len(bytearray(megabytes * 1024 * 1024))


def keeps_a_lock(n):
    import threading

    print("made it")
    return {"n": n, "guard": threading.Lock()}


def main(args):
    with local_cluster(workers=1) as dask_cluster:
        engine = DaskEngine(dask_cluster)
        with dispynb.JobCluster(area, engine=engine) as cluster:
            good, bad = cluster.submit(3, 4), cluster.submit(3)
            good(), bad()
        with dispynb.JobCluster(keeps_a_lock, engine=engine) as cluster:
            lock = cluster.submit(1)
            lock()
            try:
                import threading

                cluster.submit(threading.Lock())
                refused = None
            except dispynb.errors.SerializationError as exc:
                refused = str(exc)
        with dispynb.JobCluster(eats_memory, engine=engine) as cluster:
            limit = cluster.submit(0)() + 256 * 2**20
            big = cluster.submit(1024, dispy_job_mem_limit=limit)
            big()
        return {
            "good": [int(good.status), good.result],
            "bad": [int(bad.status), bad.exception],
            "lock": [int(lock.status), lock.stdout, lock.exception],
            "refused": refused,
            "big": [int(big.status), big.exception],
            "limit": limit,
        }
"""


def test_a_failing_call_is_reported_as_on_dispynb_nodes(
    net: Network, tmp_path: Path
) -> None:
    """``submit(3)`` for ``area(width, height)`` shows the call and the function's
    parameters, a result that cannot be pickled is named down to the part that
    cannot, and a job out of memory under its ``mem_limit`` names the limit and how
    to change it, in the words dispynb's nodes use (Dask's runner gave Python's
    message alone, and its own shorter note on the limit; for the result, "the
    job's result cannot be pickled: cannot pickle object of type 'dict' ..." with
    no part named and no way out)."""
    out = run(net, tmp_path, FAILING_CALLS_PROGRAM)
    assert out["good"] == [FINISHED, 12]
    assert out["bad"] == [
        TERMINATED,
        "TypeError: area() missing 1 required positional argument: 'height'\n"
        "(the job called area(3); area takes (width, height): give submit() the "
        "function's arguments)\n",
    ]
    assert out["lock"] == [TERMINATED, "made it\n", UNPICKLABLE_LOCK]
    refused = out["refused"]  # its argument is named, and what to send instead
    assert refused.startswith(
        "job argument 1 cannot be sent to a Dask worker: cannot pickle object of "
        "type 'lock' ("
    ), refused
    assert refused.endswith(
        "; send what it is made from instead (a file's path, not the open file; a "
        "list, not a generator) and make it in the job"
    ), refused
    status, exception = out["big"]
    assert status == TERMINATED and "MemoryError" in exception, exception
    assert exception.endswith(
        f"(the job ran with a mem_limit of {out['limit']} bytes of address space: "
        "mem_limit / dispy_job_mem_limit; give a larger limit, or None for none)\n"
    ), exception


#: What dispynb's nodes say of ``keeps_a_lock``'s result (the same on every engine).
UNPICKLABLE_LOCK = (
    "result of type 'dict' cannot be pickled; result['guard'] is a 'lock' that "
    "cannot be pickled: TypeError: cannot pickle '_thread.lock' object; return what "
    "it is made from instead (a list, not a generator; a file's path, not the open "
    "file)\n"
)


STOP_PROGRAM = """
def pids(path):
    try:
        with open(path) as handle:
            return handle.read().split()
    except FileNotFoundError:
        return []


def compute(path, seconds):
    import subprocess

    child = subprocess.Popen(["sleep", str(seconds)])
    with open(path, "w") as handle:
        handle.write(f"{os.getpid()} {child.pid}")
    child.wait()
    return seconds


def main(args):
    out = args["out"]
    with local_cluster(workers=1) as dask_cluster:
        with dispynb.JobCluster(compute, engine=DaskEngine(dask_cluster)) as cluster:
            running = cluster.submit(os.path.join(out, "running"), 300)
            queued = cluster.submit(os.path.join(out, "queued"), 300)
            deadline = time.monotonic() + 30
            marker = os.path.join(out, "running")
            while running.status != dispynb.DispyJob.Running or len(pids(marker)) < 2:
                assert time.monotonic() < deadline, "the job did not start"
                time.sleep(0.01)
            started = pids(marker)
            for job in (queued, running):  # Stop: the queue first, as %%dispy does
                cluster.cancel(job)
            queued(), running()
            # the worker has a fresh runner: the next job runs at once
            after = cluster.submit(os.path.join(out, "after"), 0)
            after()
        return {
            "pids": [int(pid) for pid in started],
            "running": [int(running.status), running.exception],
            "queued": [int(queued.status), queued.exception],
            "after": [int(after.status), after.result],
            "queued_ran": os.path.exists(os.path.join(out, "queued")),
        }
"""


def test_stop_kills_the_running_job_and_drops_the_queued_one(
    net: Network, tmp_path: Path
) -> None:
    """cancel on a running job kills its process on the worker, and the processes
    it started (Terminated); a queued one never starts (Cancelled); the worker goes
    on with a fresh runner."""
    out = run(net, tmp_path, STOP_PROGRAM, out=str(tmp_path))
    # dispynb's nodes' words (Dask's were "terminated: cancelled while it ran").
    assert out["running"] == [TERMINATED, "job terminated at the client's request"]
    assert out["queued"][0] == CANCELLED and not out["queued_ran"]
    assert out["after"] == [FINISHED, 0]
    job_pid, child_pid = out["pids"]
    assert not _alive(job_pid)
    assert not _alive(child_pid)  # the job's own subprocess went with it


CRASH_PROGRAM = """
import signal


def crashes(how):
    print("before the end", flush=True)
    if how == "exit":
        os._exit(3)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return how


def main(args):
    with local_cluster(workers=1) as dask_cluster:
        engine = DaskEngine(dask_cluster)
        with dispynb.JobCluster(crashes, engine=engine) as cluster:
            jobs = [cluster.submit(how) for how in ("exit", "kill")]
            jobs.append(cluster.submit("kill", dispy_job_mem_limit=2**40))
            jobs.append(cluster.submit("ok"))
            for job in jobs:
                job()
        return [[int(job.status), job.exception, job.result] for job in jobs]
"""


def test_a_job_whose_process_ends_says_how_as_on_dispynb_nodes(
    net: Network, tmp_path: Path
) -> None:
    """A job that calls os._exit(3), or is killed by a signal, ends Terminated in
    the words of dispynb's nodes, its exit status or signal named (before: "the
    job's process on the Dask worker died (killed or crashed)"), and its memory
    limit if it had one (before: not); the next job runs in a fresh runner."""
    out = run(net, tmp_path, CRASH_PROGRAM)
    assert out == [
        [
            TERMINATED,
            "the job's worker process exited with status 3 (os._exit() or a fatal "
            "error in an extension)\n",
            None,
        ],
        [TERMINATED, "the job's worker process was killed by SIGKILL (9)\n", None],
        [
            TERMINATED,
            "the job's worker process was killed by SIGKILL (9); it probably "
            "exceeded mem_limit of 1099511627776 bytes (mem_limit / "
            "dispy_job_mem_limit): give a larger limit, or None for none\n",
            None,
        ],
        [FINISHED, None, "ok"],
    ]


OUTPUT_PROGRAM = """
def loud(n):
    print("x" * n)
    print("y" * n, end="", file=sys.stderr)
    return n


def main(args):
    with local_cluster(workers=1) as dask_cluster:
        engine = DaskEngine(dask_cluster)
        with dispynb.JobCluster(loud, engine=engine, max_output_size=10) as cluster:
            jobs = [cluster.submit(n) for n in (25, 10)]
            return [[job(), job.stdout, job.stderr] for job in jobs]
"""


def test_output_over_max_output_size_says_what_was_dropped_as_on_nodes(
    net: Network, tmp_path: Path
) -> None:
    """A job's stdout and stderr are kept to ``max_output_size`` characters each,
    with the line dispynb's nodes (and the Ray engine) add, naming the stream and
    the option (before: "[dispynb: 16 more characters not kept]", after an empty
    line when the text kept ended a line)."""
    out = run(net, tmp_path, OUTPUT_PROGRAM)
    note = (
        "[dispynb: {} more characters of {} dropped: a job keeps 10 "
        "(max_output_size)]\n"
    )
    assert out == [
        [
            25,
            "x" * 10 + "\n" + note.format(16, "stdout"),
            "y" * 10 + "\n" + note.format(15, "stderr"),
        ],
        [10, "x" * 10 + "\n" + note.format(1, "stdout"), "y" * 10],
    ]


REFUSED_RESULT_PROGRAM = """
import ipaddress


def third(n):
    print("computing", n)
    return ipaddress.IPv4Address(n)


def main(args):
    with local_cluster(workers=1) as dask_cluster:
        engine = DaskEngine(dask_cluster)
        with dispynb.JobCluster(third, engine=engine, result_types=[]) as cluster:
            job = cluster.submit(1)
            job()
            return [int(job.status), job.stdout, job.exception]
"""


def test_a_result_refused_by_result_types_ends_terminated_in_the_nodes_words(
    net: Network, tmp_path: Path
) -> None:
    """A result whose pickle needs a global ``result_types`` does not allow ends
    Terminated with its output, "the result cannot be unpickled here: ..." naming
    the global, as from dispynb's nodes (before: "the job's result cannot be
    loaded here")."""
    status, stdout, exception = run(net, tmp_path, REFUSED_RESULT_PROGRAM)
    assert (status, stdout) == (TERMINATED, "computing 1\n")
    assert exception.startswith(
        "the result cannot be unpickled here: the result refers to "
        "ipaddress.IPv4Address, which result_types does not allow"
    ), exception


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


LIMITS_PROGRAM = """
def compute(seconds):
    time.sleep(seconds)
    return seconds


def fails():
    raise RuntimeError("no data here\\ncheck the path")


def main(args):
    with local_cluster(workers=1) as dask_cluster:
        engine = DaskEngine(dask_cluster)
        with dispynb.JobCluster(compute, engine=engine, job_timeout=0.5) as cluster:
            slow = cluster.submit(60)
            quick = cluster.submit(0)
            slow(), quick()
        errors = {}
        for name, call in {
            "setup": lambda: dispynb.JobCluster(compute, engine=engine, setup=fails),
        }.items():
            try:
                call().close()
            except dispynb.errors.DispynbError as exc:
                notes = "".join(getattr(exc, "__notes__", []))
                remote = exc.remote_traceback
                errors[name] = [type(exc).__name__, str(exc), remote, notes]
        from distributed import Client

        with (
            dispynb.JobCluster(compute, engine=engine) as cluster,
            dispynb.Executor(engine=engine) as executor,
            Client(dask_cluster) as client,
        ):
            scattered = client.scatter(b"large", broadcast=True)
            for name, call in {
                "allocate_node": lambda: cluster.allocate_node("10.0.0.1"),
                "job_depends": lambda: cluster.submit(0, dispy_job_depends=[fails]),
                "put": lambda: cluster.put(b"large"),
                "scattered": lambda: cluster.submit(scattered),
                "scattered_call": lambda: executor.submit(len, scattered),
            }.items():
                try:
                    errors[name] = ["returned", repr(call())]
                except dispynb.errors.DispynbError as exc:
                    errors[name] = [type(exc).__name__, str(exc)]
        return {
            "slow": [int(slow.status), slow.exception],
            "quick": [int(quick.status), quick.result],
            "errors": errors,
        }
"""


def test_timeouts_setup_failures_and_what_dask_cannot_do(
    net: Network, tmp_path: Path
) -> None:
    """job_timeout ends a job Terminated; a failing setup raises SetupError with the
    worker's traceback (its ``remote_traceback``, shown under the error), whole
    even when the exception's message has several lines (before, the message was
    cut at its first line and the rest put before the traceback, which then was
    not shown); dispy features Dask lacks raise one NotSupportedError."""
    out = run(net, tmp_path, LIMITS_PROGRAM)
    # dispynb's nodes' words, with the way out (Dask's were "the job ran longer
    # than its timeout of 0.5 s").
    assert out["slow"] == [
        TERMINATED,
        "the job ran over its time limit of 0.5 s (job_timeout / dispy_job_timeout) "
        "and was terminated; give a larger limit, e.g. submit(..., "
        "dispy_job_timeout=1), or None for none\n",
    ]
    assert out["quick"] == [FINISHED, 0]
    errors = out["errors"]
    kind, message, remote, notes = errors.pop("setup")
    assert kind == "SetupError"
    assert message.endswith(
        ": setup raised RuntimeError: no data here\ncheck the path"
    ), message
    assert remote.startswith("Traceback (most recent call last):\n"), remote
    assert "in fails" in remote, remote
    assert remote.endswith("RuntimeError: no data here\ncheck the path\n"), remote
    assert "The node's traceback:" in notes and "in fails" in notes, notes
    for name in ("allocate_node", "job_depends", "put"):
        kind, text = errors[name]
        assert kind == "NotSupportedError", (name, errors[name])
        assert "'dask' engine" in text or "dask" in text
    # put: what Dask users know (scatter) and what to do instead.
    assert "client.scatter(obj, broadcast=True) does not reach" in errors["put"][1]
    assert "have setup load it" in errors["put"][1]
    # A scattered Future given to a job (or a call) is refused at submit, not
    # handed to the job as a Future it cannot use.
    for name in ("scattered", "scattered_call"):
        kind, text = errors[name]
        assert kind == "NotSupportedError", (name, errors[name])
        assert "a Dask Future (of client.scatter or client.submit) cannot" in text


LARGE_PROGRAM = """
import hashlib
import threading


def digest(data, *more, tail=b""):
    parts = [data, *more, tail]
    return [
        [type(p).__name__, len(p), hashlib.sha256(p).hexdigest()] for p in parts
    ], bytes(data[::-1])


def main(args):
    size = 6 << 20
    blob = os.urandom(size)
    arguments = [
        ((blob,), {}),
        ((bytearray(blob[: 5 << 20]), memoryview(blob)[1 : 4 << 20]), {}),
        ((b"small",), {"tail": blob[: 3 << 20]}),
    ]
    with local_cluster() as dask_cluster:
        with dispynb.JobCluster(digest, engine=DaskEngine(dask_cluster)) as cluster:
            jobs = [cluster.submit(*a, **k) for a, k in arguments]
            try:
                import threading

                cluster.submit(threading.Lock())
                refused = None
            except dispynb.errors.SerializationError as exc:
                refused = str(exc)
            outcomes = []
            for job, (a, _) in zip(jobs, arguments):
                parts, reversed_data = job()
                expected = bytes(a[0][::-1])
                outcomes.append(
                    [int(job.status), job.exception, parts, reversed_data == expected]
                )
        return {
            "outcomes": outcomes,
            "expected": [
                [[type(p).__name__, len(p), hashlib.sha256(p).hexdigest()]
                 for p in [*a, k.get("tail", b"")]]
                for a, k in arguments
            ],
            "refused": refused,
        }
"""


def test_large_arguments_and_results_arrive_intact(
    net: Network, tmp_path: Path
) -> None:
    """Arguments of several MB (bytes, a bytearray, a memoryview, a keyword) reach
    the job whole and of their type (a memoryview as bytes, as on dispynb's nodes),
    and a result of several MB comes back whole; an argument that cannot be pickled
    is refused at submit, naming it."""
    out = run(net, tmp_path, LARGE_PROGRAM)
    for (status, exception, parts, reversed_ok), expected in zip(
        out["outcomes"], out["expected"], strict=True
    ):
        assert (status, exception) == (FINISHED, None)
        expected = [
            ["bytes" if kind == "memoryview" else kind, n, sha]
            for kind, n, sha in expected
        ]
        assert parts == expected
        assert reversed_ok
    assert "argument 1" in out["refused"] and "lock" in out["refused"]


EXECUTOR_PROGRAM = """
import asyncio
import contextlib
import io
import warnings


def square(x):
    return x * x


async def twice(x):
    await asyncio.sleep(0)
    return 2 * x


def init(word):
    warnings.warn("init " + word)


def main(args):
    shown = io.StringIO()  # what the jobs printed is written to sys.stderr
    with local_cluster() as dask_cluster, contextlib.redirect_stderr(shown):
        engine = DaskEngine(dask_cluster)
        with dispynb.Executor(
            engine=engine, initializer=init, initargs=("dask",)
        ) as executor:
            mapped = list(executor.map(square, range(8)))
            future = executor.submit(square, 12)
            futures = [executor.submit(twice, x) for x in range(4)]
            return {
                "map": mapped,
                "submit": future.result(timeout=30),
                "async": [f.result(timeout=30) for f in futures],
                "stderr": shown.getvalue(),
                "fresh_pids": fresh_pids(engine),
            }


def fresh_pids(engine):
    with dispynb.Executor(engine=engine, max_tasks_per_child=1) as executor:
        futures = [executor.submit(os.getpid) for _ in range(4)]
        return len({f.result(timeout=30) for f in futures})
"""


def test_the_executor_runs_on_dask(net: Network, tmp_path: Path) -> None:
    """``dispynb.Executor(engine=DaskEngine(...))``: map and submit (issue 18),
    async def functions run to their end, the initializer's warnings name their
    file, and max_tasks_per_child gives each job a new process, as on dispynb's
    nodes."""
    out = run(net, tmp_path, EXECUTOR_PROGRAM)
    stderr = out.pop("stderr")
    # max_tasks_per_child (fresh_process): a new process per job, as on nodes
    # (it was ignored: the 2 runners ran the 4 calls).
    assert out.pop("fresh_pids") == 4
    assert out == {
        "map": [x * x for x in range(8)],
        "submit": 144,
        "async": [0, 2, 4, 6],
    }
    assert "<dynamic-code>" not in stderr, stderr
    warned = r'client-\w+\.py:\d+: UserWarning: init dask\n  warnings.warn\("init '
    assert re.search(warned, stderr), stderr


WRONG_PORT_PROGRAM = """
import socket
import threading

import dispynb.backends._dasknodes as dasknodes


def compute(n):
    return n


def serve(server, http):
    held = []
    while True:
        conn, _ = server.accept()
        held.append(conn)
        if http:  # an HTTP server answers what Dask sends with an error status
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 400 Bad Request\\r\\nContent-Length: 0\\r\\n\\r\\n")


def main(args):
    dasknodes.HANDSHAKE_TIMEOUT = 3.0  # the test's patience, not the user's 20 s
    with socket.socket() as server:  # like the dashboard's port: no Dask there
        server.bind(("127.0.0.1", 0))
        server.listen()
        threading.Thread(
            target=serve, args=(server, args["server"] == "http"), daemon=True
        ).start()
        address = "127.0.0.1:%d" % server.getsockname()[1]
        start = time.monotonic()
        try:
            dispynb.JobCluster(compute, engine=DaskEngine(address))
            return {"error": None}
        except Exception as exc:
            return {
                "error": [type(exc).__name__, str(exc)],
                "seconds": time.monotonic() - start,
            }
"""


@pytest.mark.parametrize(
    ("server", "found"),
    [
        ("silent", "within 3 s: something listens there but does not speak Dask's"),
        (
            "http",
            ": something listens there but it is not a Dask scheduler: an HTTP "
            "server (it answered 'HTTP/1.1 400 Bad Request')",
        ),
    ],
)
def test_an_address_where_no_scheduler_answers_is_a_clear_error(
    net: Network, tmp_path: Path, server: str, found: str
) -> None:
    """``DaskEngine("host:8787")`` (the dashboard's port, or any server that is not
    a Dask scheduler): the connection opens but no handshake comes. Dask's client
    waited for it for ever and so did `JobCluster`; now it gives up within its
    bound with a `TransportError` that says what is likely wrong. A server that
    answers (an HTTP server) made Dask's client fail with ``MemoryError: Unable to
    allocate 3.07 EiB`` (the answer's first bytes read as a frame count); now the
    error names what answered."""
    out = run(net, tmp_path, WRONG_PORT_PROGRAM, server=server)
    assert out["error"] is not None, out
    kind, text = out["error"]
    assert kind == "TransportError", text
    assert text.startswith("no Dask scheduler answered at tcp://127.0.0.1:"), text
    assert found in text, text
    assert "8786" in text and "dashboard" in text
    assert out["seconds"] < 30


def test_import_dispynb_loads_no_dask() -> None:
    """Dask stays an optional extra: ``import dispynb`` (and its engine seam) does
    not import it."""
    import subprocess
    import sys

    code = (
        "import sys, dispynb, dispynb.backends.base;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('dask', 'distributed')))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.stdout.strip() == "[]", done.stderr


def test_node_settings_dask_cannot_honour_are_one_clear_error() -> None:
    """``nodes=`` on Dask selects workers; a `NodeAllocate`'s per-node ``cpus``,
    ``setup_args`` or ``depends`` cannot apply to a Dask worker, so they are refused
    (before anything connects) instead of being ignored; its port selects."""
    from dispynb import JobCluster, NodeAllocate
    from dispynb.backends.dask import DaskEngine, _wanted_workers
    from dispynb.errors import NotSupportedError

    engine = DaskEngine("127.0.0.1:1")  # nothing listens: it must not be reached
    for spec, what in (
        (NodeAllocate("127.0.0.1", cpus=1), "cpus"),
        (NodeAllocate("127.0.0.1", setup_args=(1,)), "setup_args"),
        (NodeAllocate("127.0.0.1", depends=[__file__]), "depends"),
    ):
        with pytest.raises(NotSupportedError, match=f"with {what}: per-node"):
            JobCluster(abs, nodes=[spec], engine=engine)
    assert _wanted_workers([NodeAllocate("10.0.0.2", port=40123)]) == ["10.0.0.2:40123"]
    assert _wanted_workers(NodeAllocate("10.0.0.2")) == ["10.0.0.2"]


LARGE_GRAPH_PROGRAM = """
import warnings


def compute(data):
    return len(data)


def main(args):
    big = os.urandom(12 << 20)  # over Dask's large-graph warning threshold (10 MB)
    from distributed import Client

    with local_cluster(workers=1) as dask_cluster:
        engine = DaskEngine(dask_cluster)
        with warnings.catch_warnings(record=True) as ours:
            warnings.simplefilter("always")
            with dispynb.JobCluster(compute, engine=engine) as cluster:
                sizes = [cluster.submit(big)()]
            with dispynb.Executor(engine=engine) as executor:
                sizes.append(executor.submit(len, big).result(timeout=60))
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            with Client(dask_cluster) as client:
                sizes.append(client.submit(len, big).result())
    return {
        "sizes": sizes,
        "ours": [str(w.message) for w in ours],
        "theirs": [str(w.message) for w in theirs],
    }
"""


def test_a_large_argument_raises_no_dask_advice_that_dispynb_refuses(
    net: Network, tmp_path: Path
) -> None:
    """A job's (or a call's) argument over 10 MB raised Dask's "Sending large
    graph" warning, whose advice (futures, scatter) dispynb refuses: not any
    more, while a user's own client.submit still warns."""
    out = run(net, tmp_path, LARGE_GRAPH_PROGRAM)
    assert out["sizes"] == [12 << 20] * 3
    assert not [w for w in out["ours"] if "large graph" in w], out["ours"]
    assert [w for w in out["theirs"] if "Sending large graph" in w], out["theirs"]


NESTED_FUTURE_PROGRAM = """
from distributed import Client


def compute(data):
    return data


def main(args):
    refused = []
    with local_cluster(workers=1) as dask_cluster, Client(dask_cluster) as client:
        scattered = client.scatter(b"x")

        class Holder:
            def __init__(self, value):
                self.value = value

        engine = DaskEngine(dask_cluster)
        with (
            dispynb.JobCluster(compute, engine=engine) as cluster,
            dispynb.Executor(engine=engine) as executor,
        ):
            for call in (
                lambda: cluster.submit([[[[[[scattered]]]]]]),
                lambda: cluster.submit({"a": {"b": {"c": {"d": [scattered]}}}}),
                lambda: cluster.submit(Holder(scattered)),
                lambda: executor.submit(len, [[[[[scattered]]]]]),
            ):
                try:
                    call()
                    refused.append("accepted")
                except dispynb.errors.NotSupportedError as exc:
                    refused.append(str(exc))
            fine = cluster.submit([[[[[["distributed.client"]]]]]])()
    return {"refused": refused, "fine": fine}
"""


def test_a_dask_future_at_any_depth_of_the_arguments_is_refused(
    net: Network, tmp_path: Path
) -> None:
    """Futures were looked for 4 levels deep in tuples, lists and dicts: one deeper,
    or in an object's attributes, went to the job, which got the Future."""
    out = run(net, tmp_path, NESTED_FUTURE_PROGRAM)
    for said in out["refused"]:
        assert said.startswith("a Dask Future (of client.scatter"), out
    assert out["fine"] == [[[[[["distributed.client"]]]]]]


SETUP_LOG_PROGRAM = """
def compute(x):
    return x


def fails():
    raise RuntimeError("no data here")


class Logged(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main(args):
    logged = Logged()
    logging.getLogger("dispynb").addHandler(logged)
    with local_cluster(workers=1) as dask_cluster:
        engine = DaskEngine(dask_cluster)
        try:
            dispynb.JobCluster(compute, engine=engine, setup=fails).close()
        except dispynb.errors.SetupError:
            pass
    return {"logged": logged.lines}
"""


def test_a_setup_failing_on_a_worker_is_logged_with_the_users_file_and_line(
    net: Network, tmp_path: Path
) -> None:
    """It was logged with the node's ``<dynamic-code>`` frames."""
    out = run(net, tmp_path, SETUP_LOG_PROGRAM)
    setup = [line for line in out["logged"] if "setup failed on Dask worker" in line]
    assert setup, out["logged"]
    assert "<dynamic-code>" not in setup[0], setup[0]
    assert re.search(r'File ".*client-\w+\.py", line \d+, in fails', setup[0]), setup


FUTURES_PROGRAM = """
import concurrent.futures as cf


def nap(x, s):
    time.sleep(s)
    return x


def boom(x):
    raise ValueError(x)


def main(args):
    out = {}
    with local_cluster(workers=2) as dask_cluster:
        executor = dispynb.Executor(engine=DaskEngine(dask_cluster))
        futures = [executor.submit(nap, i, 1.0) for i in range(6)]
        deadline = time.monotonic() + 30
        while not futures[0].running() and time.monotonic() < deadline:
            time.sleep(0.01)
        out["cancel_queued"] = futures[-1].cancel()
        out["cancel_running"] = futures[0].cancel()
        done = cf.as_completed(futures, timeout=30)
        out["as_completed"] = sorted(
            "C" if f.cancelled() else str(f.result()) for f in done
        )
        failing, slow = executor.submit(boom, 1), executor.submit(nap, 2, 2.0)
        done, pending = cf.wait(
            [failing, slow], timeout=30, return_when=cf.FIRST_EXCEPTION
        )
        out["first_exception"] = [done == {failing}, pending == {slow}]
        values = []
        try:
            for value in executor.map(nap, [1, 2, 3], [0.1, 3, 3], timeout=0.5):
                values.append(value)
        except cf.TimeoutError:
            values.append("timeout")
        out["map_timeout"] = values
        out["chunks"] = list(executor.map(abs, range(-5, 0), chunksize=2))
        try:
            executor.submit(42).result(30)
        except TypeError as exc:
            out["not_callable"] = str(exc)
        futures = [executor.submit(nap, i, 0.5) for i in range(8)]
        executor.shutdown(wait=True, cancel_futures=True)
        out["cancelled_at_shutdown"] = sum(f.cancelled() for f in futures)
        out["all_done"] = all(f.done() for f in futures)
    return out
"""


def test_the_executor_on_dask_keeps_the_concurrent_futures_semantics(
    net: Network, tmp_path: Path
) -> None:
    """What tests/api/test_executor_conformance.py checks against
    ProcessPoolExecutor, on the Dask engine: cancel a queued call (not a running
    one), as_completed, wait(FIRST_EXCEPTION), map's timeout and chunksize, a
    non-callable raising from result(), shutdown(cancel_futures=True)."""
    out = run(net, tmp_path, FUTURES_PROGRAM)
    assert out["cancel_queued"] is True and out["cancel_running"] is False
    assert out["as_completed"] == ["0", "1", "2", "3", "4", "C"]
    assert out["first_exception"] == [True, True]
    assert out["map_timeout"] == [1, "timeout"]
    assert out["chunks"] == [5, 4, 3, 2, 1]
    assert out["not_callable"] == "'int' object is not callable"
    assert out["cancelled_at_shutdown"] >= 1 and out["all_done"]


SETUP_ON_A_NEW_WORKER_PROGRAM = """
from distributed import Client

MARKER = None


def setup():
    if os.path.exists(MARKER):
        raise RuntimeError("no data here")
    return 0


def compute(x):
    return x


def main(args):
    global MARKER
    MARKER = args["marker"]
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("dispynb").addHandler(handler)
    with local_cluster(workers=1) as dask_cluster, Client(dask_cluster) as client:
        engine = DaskEngine(dask_cluster)
        with dispynb.JobCluster(compute, engine=engine, setup=setup) as cluster:
            assert cluster.submit(1)() == 1
            open(MARKER, "w").close()
            client.restart()  # the worker comes back: setup fails there now
            deadline = time.monotonic() + 30
            while not any("setup failed on Dask worker" in m for m in logged):
                assert time.monotonic() < deadline, logged
                time.sleep(0.05)
            job = cluster.submit(2)
            job()
            return {"status": int(job.status), "reason": job.exception}
"""


def test_a_job_on_a_worker_whose_setup_failed_names_the_users_file_and_line(
    net: Network, tmp_path: Path
) -> None:
    """The only worker came back and its setup failed: the job sent there ends
    Abandoned, its reason giving setup's traceback with the user's file and
    line, not the worker's ``<dynamic-code>``."""
    out = run(net, tmp_path, SETUP_ON_A_NEW_WORKER_PROGRAM, marker=str(tmp_path / "m"))
    reason = out["reason"]
    assert out["status"] == int(JobStatus.Abandoned), out
    assert reason.startswith("setup failed on Dask worker "), reason
    assert "<dynamic-code>" not in reason, reason
    assert re.search(r'File ".*client-\w+\.py", line \d+, in setup', reason), reason
    assert reason.rstrip().endswith("RuntimeError: no data here"), reason
