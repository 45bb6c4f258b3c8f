"""What the example notebooks need from the Dask engine, on real Dask clusters.

``LocalCluster(engine="dask")`` (the ``DISPYNB_LOCAL_ENGINE=dask`` parameter) is a
Dask ``SpecCluster`` with dispynb's `LocalCluster` API; on it: ``nodes=`` and
``submit_node`` restricted to Dask workers, program computations run as
subprocesses of the job's runner, and files sent back by jobs with
``dispy_send_file``. Each test runs a client program in a namespace host made by the
test (the Dask scheduler and workers live there too, on its loopback), the way the
notebooks use the API; some run the same program on dispynb's node servers and
compare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
import pytest

from dispynb.job import JobStatus
from tests.multihost.netns import Network, run_client

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(150)]

pytest.importorskip("distributed")

FINISHED, CANCELLED = int(JobStatus.Finished), int(JobStatus.Cancelled)
TERMINATED = int(JobStatus.Terminated)


def run(net: Network, tmp_path: Path, code: str, **args: Any) -> Any:
    """Run a client program (``main(args)``) in the namespace host; its result."""
    return run_client(net, net.hosts[0], tmp_path, PRELUDE + code, args, timeout=130)


PRELUDE = """
import os
import signal
import sys
import time

import dispynb
import dispynb.errors
from dispynb import JobCluster, LocalCluster


def wait_for(predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
"""


LOCAL = """
def where(x):
    print("on", dispy_node_name)
    return [dispy_node_name, os.getpid()]


def main(args):
    os.setpgid(0, 0)  # a group of its own, as Jupyter starts kernels (Stop: killpg)
    os.environ["DISPYNB_LOCAL_ENGINE"] = "dask"  # the notebooks' parameter
    out = {}
    local = LocalCluster(nodes=2, cpus=1)
    out["type"] = type(local).__name__
    out["engine"] = local.engine.name
    out["specs"] = local.node_specs()
    out["pids"] = local.pids
    with JobCluster(where, nodes=local) as cluster:
        out["all"] = sorted({j()[0] for j in [cluster.submit(n) for n in range(6)]})
        nodes = {node.name: node for node in cluster.status().nodes}
        out["nodes"] = sorted(nodes)
        pinned = [cluster.submit_node(nodes["local-1"], n) for n in range(3)]
        out["pinned"] = [j()[0] for j in pinned]
    # Stop in a notebook: SIGINT to the kernel's whole process group
    signal.signal(signal.SIGINT, lambda *_: None)
    os.killpg(0, signal.SIGINT)
    time.sleep(0.5)  # a worker killed by it would be gone by now (checked below)
    out["exited_after_sigint"] = local.exited()
    spec = local.node_specs()[0].split("//")[1]
    # dispy's wildcards too: of a host or a name ('127.0.0.*' was "no worker ...")
    for wanted in (["local-1"], [spec], ["local-1*"], ["127.0.0.*"]):
        with JobCluster(where, nodes=wanted, engine=local.engine) as cluster:
            jobs = [cluster.submit(n) for n in range(4)]
            out.setdefault("restricted", []).append(sorted({j()[0] for j in jobs}))
            out.setdefault("restricted_nodes", []).append(
                sorted(n.name for n in cluster.status().nodes)
            )
    try:
        JobCluster(where, nodes=["local-9"], engine=local.engine).close()
    except dispynb.errors.ConfigurationError as exc:
        out["unknown"] = str(exc)
    with open(args["pids"], "w") as handle:
        handle.write(" ".join(map(str, local.pids)))
    os.kill(local.pids[0], signal.SIGKILL)
    wait_for(lambda: local.exited())
    out["exited"] = local.exited()
    local.close()
    out["closed"] = repr(local)
    from dispynb.backends.dask import DaskEngine

    engine = DaskEngine.local(1)  # the same cluster, owned by the engine
    with JobCluster(where, engine=engine) as cluster:
        out["engine_local"] = cluster.submit(0)()[0]
    engine.close()
    out["engine_local_closed"] = repr(engine._owned)
    try:
        LocalCluster(engine="spark")
    except dispynb.errors.ConfigurationError as exc:
        out["bad_engine"] = str(exc)
    return out
"""


def test_local_cluster_on_dask_keeps_the_local_cluster_api(
    net: Network, tmp_path: Path
) -> None:
    """``LocalCluster`` under ``DISPYNB_LOCAL_ENGINE=dask``: Dask workers named
    ``local-N``, ``JobCluster(nodes=local)`` runs on them through their engine,
    ``submit_node`` and ``nodes=`` (a worker's name or ``host:port``, or dispy's
    wildcards of them: ``'127.0.0.*'`` found no worker) restrict the
    jobs, a name no worker has is one clear error, the process group's SIGINT (Stop
    in JupyterLab) leaves the workers alone, a dead worker shows in ``exited()``,
    and ``close`` leaves no worker process."""
    pids = tmp_path / "pids"
    out = run(net, tmp_path, LOCAL, pids=str(pids))
    assert out["type"] == "DaskLocalCluster" and out["engine"] == "dask"
    assert all(spec.startswith("tcp://127.0.0.1:") for spec in out["specs"])
    assert len(out["pids"]) == 2
    assert out["all"] == ["local-0", "local-1"] == out["nodes"]
    assert out["pinned"] == ["local-1"] * 3
    assert out["exited_after_sigint"] == []
    assert out["restricted"][0] == ["local-1"] == out["restricted_nodes"][0]
    assert len(out["restricted"][1]) == 1
    assert out["restricted"][1] == out["restricted_nodes"][1]
    assert out["restricted"][2] == ["local-1"] == out["restricted_nodes"][2]
    assert out["restricted_nodes"][3] == ["local-0", "local-1"]
    assert set(out["restricted"][3]) <= {"local-0", "local-1"}
    assert "nodes=['local-9']: no worker of the Dask cluster" in out["unknown"]
    assert "local-0 (tcp://127.0.0.1:" in out["unknown"]
    assert len(out["exited"]) == 1 and "local-0 exited" in out["exited"][0]
    assert "closed" in out["closed"]
    assert out["engine_local"] == "local-0" and out["engine_local_closed"] == "None"
    assert "'spark'" in out["bad_engine"] and "'dask'" in out["bad_engine"]
    for pid in map(int, pids.read_text().split()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


PROGRAM = """
def main(args):
    os.chdir(args["dir"])
    with open("count_words.sh", "w") as out:
        out.write(
            '#!/bin/sh\\necho "$# words: $*"\\necho "on $dispy_node_name" >&2\\n'
            'test "$#" -lt 3\\n'
        )
    os.chmod("count_words.sh", 0o755)
    with open("sleeper.sh", "w") as out:
        out.write('#!/bin/sh\\necho $$ > "$1"\\nexec sleep 60\\n')
    os.chmod("sleeper.sh", 0o755)
    out = {}
    for engine in ("nodes", "dask"):
        with LocalCluster(cpus=1, engine=engine) as local:
            with JobCluster("count_words.sh", nodes=local) as cluster:
                jobs = [cluster.submit("one"), cluster.submit("one", "two", "three")]
                out[engine] = [
                    [j(), int(j.status), j.stdout.decode(), j.stderr.decode()]
                    for j in jobs
                ]
            if engine == "dask":
                pid_file = os.path.join(args["dir"], "sleeper.pid")
                with JobCluster("sleeper.sh", nodes=local) as cluster:
                    job = cluster.submit(pid_file)
                    wait_for(lambda: os.path.exists(pid_file) and open(pid_file).read())
                    out["sleeper_pid"] = int(open(pid_file).read())
                    cluster.cancel(job)
                    job()
                    out["cancelled"] = int(job.status)
    return out
"""


def test_a_program_computation_runs_on_dask_as_on_nodes(
    net: Network, tmp_path: Path
) -> None:
    """``JobCluster("count_words.sh")`` on Dask: the program runs once per job on the
    worker with the job's arguments, the result is its exit code, stdout and stderr
    its output as bytes, exactly as on dispynb's node servers; cancelling a running
    job kills the program."""
    out = run(net, tmp_path, PROGRAM, dir=str(tmp_path))
    assert out["dask"][0] == [0, FINISHED, "1 words: one\n", "on local-0\n"]
    assert out["dask"][1] == [1, FINISHED, "3 words: one two three\n", "on local-0\n"]
    assert [row[:3] for row in out["dask"]] == [row[:3] for row in out["nodes"]]
    assert out["nodes"][0][3] == "on local-0\n"
    assert out["cancelled"] in (CANCELLED, TERMINATED)
    pid = out["sleeper_pid"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


SEND_FILE = """
def report(n):
    os.makedirs("sub", exist_ok=True)
    name = f"sub/report-{n}.txt" if n else f"report-{n}.txt"
    with open(name, "w") as out:
        out.write(f"report {n}: {n * n}\\n")
    sent = dispy_send_file(name)
    with open(f"big-{n}.bin", "wb") as out:  # jobs share the directory
        out.write(b"x" * (int(args_big) + 1))
    too_big = dispy_send_file(f"big-{n}.bin")
    missing = dispy_send_file("no-such-file")
    return [name, sent, too_big, missing]


def read_input(n):
    with open("data/input.txt") as handle:
        return [dispy_node_name, handle.read()]


def main(args):
    global args_big
    from dispynb.backends.dask import MAX_SENT_FILE

    args_big = MAX_SENT_FILE
    os.chdir(args["dir"])
    out = {}
    with LocalCluster(nodes=2, cpus=1, engine="dask") as local:
        with JobCluster(report, nodes=local, depends=[]) as cluster:
            jobs = [cluster.submit(n) for n in range(3)]
            out["results"] = [j() for j in jobs]
            # read as soon as each job is done: the file came before its result
            out["files"] = [open(j.result[0]).read() for j in jobs]
            out["stderr"] = jobs[0].stderr
        received = os.path.join(args["dir"], "received")
        os.mkdir(received)
        with JobCluster(report, nodes=local, files_dir=received) as cluster:
            job = cluster.submit(1)
            job()
            saved = os.path.join(received, "sub", "report-1.txt")
            out["files_dir"] = open(saved).read()
        os.mkdir("data")
        with open("data/input.txt", "w") as handle:
            handle.write("from the client")
        with JobCluster(read_input, nodes=local) as cluster:
            nodes = sorted(cluster.status().nodes, key=lambda node: node.name)
            out["sent"] = [cluster.send_file("data/input.txt", n) for n in nodes]
            jobs = [cluster.submit_node(node, 0) for node in nodes]
            out["read"] = [j() for j in jobs]
            out["unknown"] = cluster.send_file("data/input.txt", "10.9.9.9")
    out["big_here"] = [name for name in os.listdir() if name.startswith("big")]
    return out
"""


def test_files_between_the_client_and_dask_workers(
    net: Network, tmp_path: Path
) -> None:
    """``dispy_send_file(path)`` in a job on Dask: the client saves the file at the
    same relative path in its working directory (or ``files_dir``) before the job's
    result arrives; a file over `MAX_SENT_FILE` or missing is not sent (-1, the
    reason in the job's stderr). The client's ``send_file(path, node)`` puts a file
    in the computation's directory on that worker (-1 for a node it does not
    have)."""
    out = run(net, tmp_path, SEND_FILE, dir=str(tmp_path))
    names = ["report-0.txt", "sub/report-1.txt", "sub/report-2.txt"]
    assert out["results"] == [[name, 0, -1, -1] for name in names]
    assert out["files"] == [f"report {n}: {n * n}\n" for n in range(3)]
    assert "the most a job on the Dask engine may send" in out["stderr"]
    assert "no-such-file" in out["stderr"]
    assert out["files_dir"] == "report 1: 1\n"
    assert out["sent"] == [0, 0] and out["unknown"] == -1
    assert out["read"] == [
        ["local-0", "from the client"],
        ["local-1", "from the client"],
    ]
    assert out["big_here"] == []


HELD = """
def sends(n):
    name = f"out-{n}.bin"
    with open(name, "wb") as handle:
        handle.write(os.urandom(1 << 20))
    dispy_provisional_result(b"p" * (1 << 20))
    return dispy_send_file(name)


def main(args):
    import pickle

    from distributed import Client

    def held(watcher):
        # What the scheduler keeps of each topic's events, in bytes (over 64 KiB).
        sizes = {
            topic: len(pickle.dumps(events))
            for topic, events in watcher.get_events().items()
        }
        return {topic: size for topic, size in sizes.items() if size > 1 << 16}

    os.chdir(args["dir"])
    out = {}
    with LocalCluster(nodes=2, cpus=1, engine="dask") as local:
        with Client(local.engine.address, timeout=30) as watcher:
            with JobCluster(sends, engine=local.engine) as cluster:
                out["results"] = [j() for j in [cluster.submit(n) for n in range(4)]]
                out["open"] = held(watcher)
            out["closed"] = held(watcher)
    out["received"] = sorted(
        name for name in os.listdir(".") if name.startswith("out-")
    )
    return out
"""


def test_the_scheduler_keeps_none_of_what_jobs_sent(
    net: Network, tmp_path: Path
) -> None:
    """Provisional results and files sent by jobs reach the client, and the Dask
    scheduler keeps none of them, while the cluster is open or after it closed
    (before, it stored the last 1000 of each cluster's, for an hour after: here
    4 MiB; up to 32 GiB for files of 32 MiB)."""
    out = run(net, tmp_path, HELD, dir=str(tmp_path))
    assert out["results"] == [0] * 4
    assert out["received"] == [f"out-{n}.bin" for n in range(4)]
    assert out["open"] == {} and out["closed"] == {}


REFUSED = """
def nested(n):
    os.makedirs("sub", exist_ok=True)
    with open("sub/out.txt", "w") as out:
        out.write("nested")
    refused = dispy_send_file("sub/out.txt")
    with open("flat.txt", "w") as out:
        out.write("flat")
    gave_up = dispy_send_file("flat.txt", timeout=0)
    sent = dispy_send_file("flat.txt")
    return [refused, gave_up, sent]


def main(args):
    received = os.path.join(args["dir"], "received")
    os.mkdir(received)
    with open(os.path.join(received, "sub"), "w") as out:
        out.write("a file where the job's folder should be")
    with LocalCluster(nodes=1, cpus=1, engine="dask") as local:
        with JobCluster(nested, nodes=local, files_dir=received) as cluster:
            job = cluster.submit(0)
            job()
    with open(os.path.join(received, "flat.txt")) as handle:
        flat = handle.read()
    return {"result": job.result, "stderr": job.stderr, "flat": flat}
"""


LEFT_WAITING = """
def leaves_a_sender(n):
    import threading

    with open(f"out-{n}.bin", "wb") as out:
        out.write(b"x" * (8 << 20))
    threading.Thread(target=dispy_send_file, args=(f"out-{n}.bin",)).start()
    return n


def main(args):
    os.chdir(args["dir"])
    with LocalCluster(nodes=1, cpus=1, engine="dask") as local:
        with JobCluster(leaves_a_sender, nodes=local) as cluster:
            jobs = [cluster.submit(n) for n in range(20)]
            done = cluster.wait(timeout=60)
    return {"done": done, "results": [job.result for job in jobs]}
"""


def test_a_thread_left_waiting_for_its_file_does_not_take_the_next_job(
    net: Network, tmp_path: Path
) -> None:
    """Jobs whose thread sends 8 MiB and waits for the answer return at once, one
    runner: the thread gives up once its job returned, and the runner reads the
    next job only then (before: the thread took the next job's message for a late
    answer, and that job never ran)."""
    out = run(net, tmp_path, LEFT_WAITING, dir=str(tmp_path))
    assert out["done"] is True, out
    assert out["results"] == list(range(20))


def test_dispy_send_file_on_dask_returns_0_only_once_the_client_wrote_it(
    net: Network, tmp_path: Path
) -> None:
    """The client answers each file a job sends on Dask, as on dispynb's nodes: -1
    (and why, on the job's stderr) for a file the client cannot write (its
    ``sub`` is a file) or whose answer the job stopped waiting for (timeout=0),
    0 once written; the late answer does not confuse the next call (before: 0
    for all three)."""
    out = run(net, tmp_path, REFUSED, dir=str(tmp_path))
    assert out["result"] == [-1, -1, 0], out
    assert "'sub/out.txt' not sent" in out["stderr"], out["stderr"]
    assert "is not a directory" in out["stderr"], out["stderr"]
    assert "did not confirm it within 0" in out["stderr"], out["stderr"]
    assert out["flat"] == "flat"


PATIENT = """
def patient(timeout):
    with open("p.bin", "wb") as out:
        out.write(b"p" * 100)
    return dispy_send_file("p.bin", timeout=timeout)


def main(args):
    received = os.path.join(args["dir"], "received")
    os.mkdir(received)
    with LocalCluster(nodes=1, cpus=1, engine="dask") as local:
        with JobCluster(patient, nodes=local, files_dir=received) as cluster:
            jobs = [cluster.submit(t) for t in (30 * 86400, 1e300, float("inf"))]
            cluster.wait(timeout=60)
            return [[j.status, j.result, j.exception] for j in jobs]
"""


def test_dispy_send_file_on_dask_waits_as_long_as_it_is_told(
    net: Network, tmp_path: Path
) -> None:
    """A timeout longer than a poll can wait at once (30 days, 1e300, infinity)
    waits for the answer: 0 (OverflowError from the job, b516cf3)."""
    out = run(net, tmp_path, PATIENT, dir=str(tmp_path))
    assert out == [[FINISHED, 0, None]] * 3, out


LATE_SENDER = """
def late_sender(n, marks):
    import json, threading

    if n == 0:
        def late():
            wait_for(lambda: os.path.exists(os.path.join(marks, "job-1-runs")))
            with open("late.txt", "w") as out:
                out.write("from a thread of job 0")
            sent = dispy_send_file("late.txt")
            told = dispy_provisional_result("from a thread of job 0")
            with open(os.path.join(marks, "noted.tmp"), "w") as out:
                json.dump([sent, told], out)
            os.rename(os.path.join(marks, "noted.tmp"), os.path.join(marks, "noted"))

        threading.Thread(target=late, daemon=True).start()
        return "job 0"
    open(os.path.join(marks, "job-1-runs"), "w").close()
    wait_for(lambda: os.path.exists(os.path.join(marks, "noted")))
    return "job 1"


def main(args):
    import json

    marks, received = (os.path.join(args["dir"], d) for d in ("marks", "received"))
    os.mkdir(marks)
    os.mkdir(received)
    provisional = []

    def status(job):
        if job.status == dispynb.DispyJob.ProvisionalResult:
            provisional.append(job.result)

    with LocalCluster(nodes=1, cpus=1, engine="dask") as local:
        with JobCluster(
            late_sender, nodes=local, files_dir=received, job_status=status
        ) as cluster:
            jobs = [cluster.submit(n, marks) for n in range(2)]
            results = [job() for job in jobs]
    with open(os.path.join(marks, "noted")) as noted:
        return {
            "results": results,
            "noted": json.load(noted),
            "provisional": provisional,
            "received": os.listdir(received),
            "stderr": jobs[1].stderr,
        }
"""


def test_a_thread_of_a_job_that_returned_sends_nothing_as_the_next_job_on_dask(
    net: Network, tmp_path: Path
) -> None:
    """A thread job 0 left running sends a file and a provisional result while
    its runner runs job 1: both went out as job 1's (the file saved, the value
    shown as job 1's). Now neither is sent, and both calls return -1 (as on
    dispynb's nodes, tests/api/test_sent_files.py)."""
    out = run(net, tmp_path, LATE_SENDER, dir=str(tmp_path))
    assert out["results"] == ["job 0", "job 1"], out
    assert out["noted"] == [-1, -1], out
    assert out["provisional"] == [], out
    assert out["received"] == [], out
    assert "not sent" not in out["stderr"], out  # not job 1's to say


LATE_PRINTER = """
def late_printer(n, marks):
    import threading

    if n == 0:
        def late():
            wait_for(lambda: os.path.exists(os.path.join(marks, "job-1-runs")))
            print("late out from a thread of job 0")
            print("late err from a thread of job 0", file=sys.stderr)
            printed = os.path.join(marks, "printed")
            open(printed + ".tmp", "w").close()
            os.rename(printed + ".tmp", printed)

        print("job 0 out")
        threading.Thread(target=late, daemon=True).start()
        return "job 0"
    print("job 1 out")
    open(os.path.join(marks, "job-1-runs"), "w").close()
    own = threading.Thread(
        target=print, args=("job 1 err from its thread",), kwargs={"file": sys.stderr}
    )
    own.start()
    own.join()
    wait_for(lambda: os.path.exists(os.path.join(marks, "printed")))
    return "job 1"


def main(args):
    marks = os.path.join(args["dir"], "marks")
    os.mkdir(marks)
    with LocalCluster(nodes=1, cpus=1, engine="dask") as local:
        with JobCluster(late_printer, nodes=local) as cluster:
            jobs = [cluster.submit(n, marks) for n in range(2)]
            results = [job() for job in jobs]
    return {
        "results": results,
        "printed": os.path.exists(os.path.join(marks, "printed")),
        "output": [[job.stdout, job.stderr] for job in jobs],
    }
"""


def test_a_thread_of_a_job_that_returned_prints_into_no_later_job_on_dask(
    net: Network, tmp_path: Path
) -> None:
    """A thread job 0 left running prints while its runner runs job 1: the lines
    were in job 1's stdout and stderr. Now job 1's output is its own (its thread's
    line included); the late lines go to the runner's own streams (as on dispynb's
    nodes, tests/nodeserver/test_thread_output.py)."""
    out = run(net, tmp_path, LATE_PRINTER, dir=str(tmp_path))
    assert out["results"] == ["job 0", "job 1"], out
    assert out["printed"], out
    assert out["output"] == [
        ["job 0 out\n", ""],
        ["job 1 out\n", "job 1 err from its thread\n"],
    ], out


LOGGER = """
def log_a_line(n):
    import logging

    if n == 0:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("job").info("job %d logs", n)
    return n


def main(args):
    with LocalCluster(nodes=1, cpus=1, engine="dask") as local:
        with JobCluster(log_a_line, nodes=local) as cluster:
            jobs = []
            for n in range(3):  # one after the other, on the one runner
                job = cluster.submit(n)
                job()
                jobs.append(job)
    return [[job.result, job.stderr] for job in jobs]
"""


def test_a_log_handler_set_up_by_an_earlier_job_logs_into_each_jobs_stderr_on_dask(
    net: Network, tmp_path: Path
) -> None:
    """Job 0 calls ``logging.basicConfig()``: its handler kept job 0's stderr, so
    the lines jobs 1 and 2 logged in that runner were lost. Now they are in each
    job's stderr (as on dispynb's nodes, tests/nodeserver/test_thread_output.py)."""
    out = run(net, tmp_path, LOGGER)
    assert out == [[n, f"job {n} logs\n"] for n in range(3)], out
