"""The Dask engine on a multi-host Dask cluster: ``dask scheduler`` on h1, ``dask
worker`` on h2 and h3 (namespace hosts on one bridge), the client program on h4.

Jobs spread over both worker hosts; when a worker is killed (``kill -9`` of its
process group but multiprocessing's resource tracker, which unlinks the nanny's
semaphores: `tests.backends.daskhosts`) while it runs a job, a reentrant job runs
again on the other worker and a non-reentrant one is abandoned, as dispy does with
a lost node's jobs, and is never run a second time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb.job import JobStatus
from tests.backends.daskhosts import DaskCluster, dask_cluster, start_worker
from tests.multihost.netns import (
    Network,
    hosts_or_skip,
    run_client,
    start_client,
    wait_for,
)
from tests.nodeproc import node_env

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(150)]

pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def net() -> Iterator[Network]:
    """h1: scheduler, h2 and h3: workers, h4: the client."""
    with hosts_or_skip(4) as network:
        yield network


@pytest.fixture
def cluster(net: Network, tmp_path: Path) -> Iterator[DaskCluster]:
    """A fresh Dask cluster for each test (a test may kill one of its workers)."""
    hosts = net.hosts
    with dask_cluster(net, hosts[0], hosts[1:3], tmp_path / "dask") as started:
        yield started


CLIENT = """
import os
import time

import dispynb
from dispynb.backends.dask import DaskEngine


def compute(marker, n, seconds):
    with open(marker, "a") as handle:
        handle.write(f"{n} {os.getpid()} {dispy_node_ip_addr}\\n")
    time.sleep(seconds)
    return dispy_node_ip_addr


def main(args):
    engine = DaskEngine(args["scheduler"])
    with dispynb.JobCluster(
        compute, engine=engine, reentrant=args["reentrant"]
    ) as cluster:
        nodes = sorted(node.ip_addr for node in cluster.status().nodes)
        jobs = [
            cluster.submit_job_id(n, args["marker"], n, seconds)
            for n, seconds in enumerate(args["seconds"])
        ]
        cluster.wait()
    return {
        "nodes": nodes,
        "jobs": [[j.id, int(j.status), j.result, j.exception, j.ip_addr] for j in jobs],
    }
"""


def test_jobs_run_on_every_worker_host(
    net: Network, cluster: DaskCluster, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    args = {
        "scheduler": cluster.address,
        "marker": str(marker),
        "reentrant": False,
        "seconds": [0.3] * 6,
    }
    client = start_client(net, net.hosts[3], tmp_path, CLIENT, args)
    try:
        out = client.result(90)
    finally:
        client.stop()
    assert out["nodes"] == ["10.77.0.2", "10.77.0.3"]
    statuses = {status for _, status, _, _, _ in out["jobs"]}
    assert statuses == {int(JobStatus.Finished)}
    for _, _, result, _, ip_addr in out["jobs"]:
        assert result == ip_addr  # where dispy says it ran is where it ran
    assert {result for _, _, result, _, _ in out["jobs"]} == {"10.77.0.2", "10.77.0.3"}


@pytest.mark.parametrize("reentrant", [False, True], ids=["abandoned", "resubmitted"])
def test_a_job_whose_worker_dies(
    net: Network, cluster: DaskCluster, tmp_path: Path, reentrant: bool
) -> None:
    """Job 0 runs long; its worker is killed while it runs. Reentrant: it runs again
    on the other worker and finishes. Not reentrant: Abandoned, run once only. Job
    1, on the other worker, finishes either way."""
    marker = tmp_path / "ran"
    args = {
        "scheduler": cluster.address,
        "marker": str(marker),
        "reentrant": reentrant,
        "seconds": [5.0, 0.2],
    }
    client = start_client(net, net.hosts[3], tmp_path, CLIENT, args)
    try:
        wait_for(lambda: _runs(marker, 0), 60, "job 0 starting")
        first = _runs(marker, 0)[0]
        victim = next(w for w in cluster.workers if w.host.ip == first[1])
        assert first[0] in _pids_in(victim.host.netns)
        victim.kill()
        out = client.result(90)
    finally:
        client.stop()
    job0, job1 = out["jobs"]
    assert job1[1] == int(JobStatus.Finished)
    runs = _runs(marker, 0)
    if reentrant:
        assert job0[1] == int(JobStatus.Finished)
        assert [ip for _, ip in runs] == [first[1], job0[2]] and job0[2] != first[1]
    else:
        assert job0[1] == int(JobStatus.Abandoned)
        assert first[1] in job0[3] or "lost" in job0[3]
        assert job0[4] == first[1]
        assert runs == [first]  # never started again


def _runs(marker: Path, n: int) -> list[tuple[str, str]]:
    """(pid, host ip) of every start of job ``n`` so far."""
    if not marker.exists():
        return []
    starts = []
    for line in marker.read_text().splitlines():
        number, pid, ip = line.split()
        if int(number) == n:
            starts.append((pid, ip))
    return starts


def _pids_in(netns: str) -> list[str]:
    listing = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10
    )
    return listing.stdout.split()


def test_nothing_is_left_on_the_workers_after_close(
    net: Network, cluster: DaskCluster, tmp_path: Path
) -> None:
    """After the client closed, no host or runner process of dispynb remains on
    the worker hosts (the plugin's teardown ended them)."""
    args = {
        "scheduler": cluster.address,
        "marker": str(tmp_path / "ran"),
        "reentrant": False,
        "seconds": [0.0] * 4,
    }
    client = start_client(net, net.hosts[3], tmp_path, CLIENT, args)
    try:
        client.result(90)
    finally:
        client.stop()
    deadline = time.monotonic() + 20

    def leftovers() -> list[str]:
        found = []
        for worker in cluster.workers:
            for pid in _pids_in(worker.host.netns):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"_daskhost" in cmdline:
                    found.append(pid)
        return found

    while leftovers():
        assert time.monotonic() < deadline, f"left on the workers: {leftovers()}"
        time.sleep(0.05)


MAGICS = """
import contextlib
import io

from IPython.core.interactiveshell import InteractiveShell


def main(args):
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "dispynb")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        shell.run_line_magic("dispy", f"dask {args['scheduler']}")
        shell.run_cell_magic(
            "dispy",
            '--over "range(6)" --into run --progress none',
            "def where(x):\\n    print('on', dispy_node_ip_addr)\\n"
            "    return dispy_node_ip_addr\\n",
        )
        status = repr(shell.run_line_magic("dispy", "status"))
        shell.run_line_magic("dispy", "close")
    run = shell.user_ns["run"]
    frame = run.df
    return {
        "printed": out.getvalue(),
        "status": status,
        "results": list(run.results),
        "stdout": list(frame["stdout"]),
        "nodes": sorted(set(frame["node"].astype(str))),
    }
"""


def test_the_magics_on_a_dask_cluster(
    net: Network, cluster: DaskCluster, tmp_path: Path
) -> None:
    """``%dispy dask ADDRESS`` then ``%%dispy``: the jobs run on the Dask workers,
    their output is printed in the cell and kept in ``run.df``."""
    client = start_client(
        net, net.hosts[3], tmp_path, MAGICS, {"scheduler": cluster.address}
    )
    try:
        out = client.result(90)
    finally:
        client.stop()
    assert f"dispynb: dask engine: {cluster.address}" in out["printed"]
    assert f"dask engine: {cluster.address}" in out["status"]
    assert set(out["results"]) == {"10.77.0.2", "10.77.0.3"}
    assert out["stdout"] == [f"on {ip}\n" for ip in out["results"]]
    for ip in out["results"]:
        assert f"on {ip}" in out["printed"]  # remote stdout routed to the cell
    assert all(node.startswith(("10.77.0.2", "10.77.0.3")) for node in out["nodes"])


LATE = """
import os
import time

import dispynb
from dispynb.backends.dask import DaskEngine


def setup():
    global prepared
    prepared = f"set up on {dispy_node_ip_addr}"
    return 0


def compute(n):
    return prepared


def main(args):
    engine = DaskEngine(args["scheduler"])
    with dispynb.JobCluster(compute, engine=engine, setup=setup) as cluster:
        open(args["opened"], "w").close()
        deadline = time.monotonic() + 60
        while "10.77.0.1" not in [n.ip_addr for n in cluster.status().nodes]:
            assert time.monotonic() < deadline, "the late worker never became ready"
            time.sleep(0.05)
        late = next(n for n in cluster.status().nodes if n.ip_addr == "10.77.0.1")
        jobs = [cluster.submit_node(late, n) for n in range(3)]
        cluster.wait()
    return [[j.result, j.ip_addr, int(j.status)] for j in jobs]
"""


def test_a_worker_joining_later_is_set_up_and_used(
    net: Network, cluster: DaskCluster, tmp_path: Path
) -> None:
    """A ``dask worker`` started after the cluster opened runs setup (the plugin is
    registered for new workers too), becomes a node, and ``submit_node`` runs jobs
    there."""
    opened = tmp_path / "opened"
    args = {"scheduler": cluster.address, "opened": str(opened)}
    client = start_client(net, net.hosts[3], tmp_path, LATE, args)
    try:
        wait_for(opened.exists, 60, "the client opening its cluster")
        cluster.workers.append(
            start_worker(net, net.hosts[0], cluster.address, tmp_path / "dask")
        )
        out = client.result(90)
    finally:
        client.stop()
    finished = int(JobStatus.Finished)
    assert out == [["set up on 10.77.0.1", "10.77.0.1", finished]] * 3


SCHEDULER_LOST = """
import time

import dispynb
from dispynb.backends.dask import DaskEngine


def compute(x):
    time.sleep(120)
    return x


def main(args):
    with dispynb.JobCluster(compute, engine=DaskEngine(args["scheduler"])) as cluster:
        jobs = [cluster.submit(n) for n in range(3)]
        open(args["opened"], "w").close()
        done = cluster.wait(timeout=60)
    return {"done": done, "jobs": [[int(j.status), j.exception] for j in jobs]}
"""


def test_the_scheduler_dies(net: Network, cluster: DaskCluster, tmp_path: Path) -> None:
    """kill -9 of ``dask scheduler`` while jobs run: they end Abandoned, saying
    the scheduler was lost, instead of waiting for ever."""
    opened = tmp_path / "opened"
    args = {"scheduler": cluster.address, "opened": str(opened)}
    client = start_client(net, net.hosts[3], tmp_path, SCHEDULER_LOST, args)
    try:
        wait_for(opened.exists, 60, "the client submitting its jobs")
        cluster.scheduler.kill()
        out = client.result(90)
    finally:
        client.stop()
    assert out["done"] is True
    for status, exception in out["jobs"]:
        assert status == int(JobStatus.Abandoned)
        assert f"Dask scheduler at {cluster.address} was lost" in exception


WAITS_FOR_ITS_FILE = """
import os
import time

import dispynb
from dispynb.backends.dask import DaskEngine


def sends(marks, go):
    with open(os.path.join(marks, "pid.tmp"), "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(os.path.join(marks, "pid.tmp"), os.path.join(marks, "pid"))
    while not os.path.exists(go):
        time.sleep(0.02)
    with open("out.txt", "w") as handle:
        handle.write("for a client that never answers")
    open(os.path.join(marks, "sending"), "w").close()
    sent = dispy_send_file("out.txt")
    with open(os.path.join(marks, "returned"), "w") as handle:
        handle.write(str(sent))
    return sent


def main(args):
    engine = DaskEngine(args["scheduler"])
    with dispynb.JobCluster(sends, engine=engine) as cluster:
        cluster.submit(args["marks"], args["go"])
        time.sleep(300)  # killed before it gets further
"""


def test_a_job_waiting_for_its_file_stops_when_its_client_dies(
    net: Network, cluster: DaskCluster, tmp_path: Path
) -> None:
    """The client is stopped (SIGSTOP: it answers nothing) while its job sends a
    file, then killed (SIGKILL): Dask drops the dead client's tasks, so the job,
    waiting in dispy_send_file for an answer that cannot come, is stopped (its
    runner killed) rather than left waiting: what choose-engine.md says."""
    marks, go = tmp_path / "marks", tmp_path / "go"
    marks.mkdir()
    args = {"scheduler": cluster.address, "marks": str(marks), "go": str(go)}
    client = start_client(net, net.hosts[3], tmp_path, WAITS_FOR_ITS_FILE, args)
    try:
        wait_for(lambda: (marks / "pid").exists(), 60, "the job starting")
        runner = int((marks / "pid").read_text())
        client.proc.send_signal(signal.SIGSTOP)
        go.touch()
        wait_for(lambda: (marks / "sending").exists(), 30, "the job sending")
        client.proc.send_signal(signal.SIGKILL)
        client.proc.communicate(timeout=30)
        wait_for(lambda: not _alive(runner), 60, "the job's runner stopping")
    finally:
        client.stop()
    assert not (marks / "returned").exists()  # stopped while it waited


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


NO_DISPYNB = """
import dispynb
import dispynb.errors
from dispynb.backends.dask import DaskEngine


def main(args):
    try:
        dispynb.JobCluster(abs, engine=DaskEngine(args["scheduler"])).close()
    except Exception as exc:
        return [type(exc).__name__, str(exc)]
    return None
"""


def test_a_worker_without_dispynb_is_one_clear_error(
    net: Network, tmp_path: Path
) -> None:
    """A Dask worker where dispynb cannot be imported: the cluster does not open,
    with a `SetupError` saying to install dispynb on the workers (a bare
    ``Exception: ModuleNotFoundError('No module named dispynb')`` before)."""
    hidden = tmp_path / "no-dispynb"
    hidden.mkdir()
    (hidden / "dispynb.py").write_text(
        "raise ModuleNotFoundError('No module named dispynb', name='dispynb')\n"
    )
    env = node_env()
    env["PYTHONPATH"] = os.pathsep.join([str(hidden), env.get("PYTHONPATH", "")])
    with dask_cluster(net, net.hosts[0], [], tmp_path / "dask") as cluster:
        cluster.workers.append(
            start_worker(net, net.hosts[1], cluster.address, tmp_path / "dask", env=env)
        )
        args = {"scheduler": cluster.address}
        out = run_client(net, net.hosts[3], tmp_path, NO_DISPYNB, args, timeout=90)
    assert out is not None and out[0] == "SetupError", out
    assert "cannot load dispynb (ModuleNotFoundError: No module named" in out[1]
    assert "install dispynb on them" in out[1]
