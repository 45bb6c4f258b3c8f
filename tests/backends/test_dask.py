"""The Dask engine on a real ``distributed.LocalCluster`` (worker processes): a dispy
program, its jobs' failures, stop, crashes, output, timeouts and setup.

Each test runs a client program inside a namespace host made by the test (the
LocalCluster's scheduler and workers live there too, on its loopback): dispy's API
with ``engine=DaskEngine(...)``, as users write it (`daskclient.py`). What the
program saw comes back as JSON; process checks (is the stopped job's process gone?) are
made from here. Arguments and results: `test_dask_data.py`; the Executor:
`test_dask_executor.py`; errors outside the jobs: `test_dask_errors.py`.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from dispynb.jobenv import OUTPUT_OPTION
from tests.backends.daskclient import (
    CANCELLED,
    CREATED,
    FINISHED,
    RUNNING,
    TERMINATED,
    run,
)
from tests.multihost.netns import Network

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(120)]

pytest.importorskip("distributed")


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
        "[dispynb: {} more characters of {} dropped: a job keeps 10 ("
        + OUTPUT_OPTION
        + ")]\n"
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


LOST_WORKER_PROGRAM = """
import signal

from distributed import Client


def nap(marker, n):
    with open(marker, "a") as handle:
        handle.write(f"{n}\\n")
    time.sleep(60)
    return n


def main(args):
    # Two workers of one thread: Dask sends each two tasks, one to run, one to
    # wait behind it (its worker-saturation).
    with local_cluster(workers=2) as dask_cluster, Client(dask_cluster) as client:
        with dispynb.JobCluster(nap, engine=DaskEngine(client)) as cluster:
            jobs = [cluster.submit(args["marker"], n) for n in range(4)]
            deadline = time.monotonic() + 60
            while sum(job.status == dispynb.DispyJob.Running for job in jobs) < 2:
                assert time.monotonic() < deadline, "the jobs never started"
                time.sleep(0.05)
            workers = client.run(os.getpid)
            os.kill(workers[min(workers)], signal.SIGKILL)
            deadline = time.monotonic() + 60
            while sum(job.status == dispynb.DispyJob.Abandoned for job in jobs) < 2:
                assert time.monotonic() < deadline, "no job was abandoned"
                time.sleep(0.05)
            started = open(args["marker"]).read().split()
            lost = [
                [str(n) in started, job.exception]
                for n, job in enumerate(jobs)
                if job.status == dispynb.DispyJob.Abandoned
            ]
            cluster.close(terminate=True)
            return sorted(lost)
"""


def test_a_lost_workers_job_that_had_not_started_is_not_said_to_have_run(
    net: Network, tmp_path: Path
) -> None:
    """A Dask worker killed with a job running and one waiting behind it: both end
    Abandoned (not reentrant), the running one "lost while it ran", the waiting one
    not (it said so too: a user deciding whether its effects happened was told it
    ran)."""
    marker = tmp_path / "started"
    marker.touch()
    lost = run(net, tmp_path, LOST_WORKER_PROGRAM, marker=str(marker))
    assert [ran for ran, _ in lost] == [False, True], lost
    waited, ran = (reason for _, reason in lost)
    assert " was lost while it ran (not reentrant)" in ran, ran
    assert "while it ran" not in waited, waited
    assert (
        " was lost while the job waited there or had just begun (not reentrant)"
        in waited
    ), waited
