"""What a JobCluster offers works through the scheduler: callbacks, provisional
results, files both ways, setup and cleanup, cancelling a running job, node status."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dispynb import LocalCluster, SharedJobCluster
from dispynb.job import DispyJob, JobStatus
from tests.sharedsched.harness import WAIT, SchedulerProcess

pytestmark = pytest.mark.slow


def setup(name: str) -> int:
    global greeting
    greeting = f"hello {name}"
    return 0


def greet_with_file(n: int) -> str:
    import time

    with open("data.txt") as handle:  # a depends file, in the job's directory
        text = handle.read().strip()
    dispy_provisional_result(f"half {n}")  # type: ignore[name-defined]  # noqa: F821
    time.sleep(0.2)
    with open(f"out-{n}.txt", "w") as handle:
        handle.write(f"{greeting} {n}")  # type: ignore[name-defined]
    dispy_send_file(f"out-{n}.txt")  # type: ignore[name-defined]  # noqa: F821
    return f"{greeting} {text} {n}"  # type: ignore[name-defined]


def test_setup_depends_provisional_results_files_and_callbacks(
    scheduler: SchedulerProcess,
    users: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "data.txt"
    data.write_text("with data\n")
    monkeypatch.chdir(tmp_path)
    seen: list[tuple[int, object]] = []
    lock = threading.Lock()

    def job_status(job: DispyJob) -> None:
        with lock:
            seen.append((int(job.status), job.result))

    from dispynb import NodeAllocate

    with SharedJobCluster(
        greet_with_file,
        scheduler_host=scheduler.address,
        secret_file=str(users["alice"]),
        depends=[str(data)],
        setup=setup,
        nodes=[NodeAllocate("*", setup_args=("alice",))],
        job_status=job_status,
    ) as cluster:
        jobs = [cluster.submit(n) for n in range(3)]
        assert [job() for job in jobs] == [
            f"hello alice with data {n}" for n in range(3)
        ]
        cluster.wait(timeout=10)
    for n in range(3):
        assert (tmp_path / f"out-{n}.txt").read_text() == f"hello alice {n}"
    provisional = {r for s, r in seen if s == int(JobStatus.ProvisionalResult)}
    assert provisional == {f"half {n}" for n in range(3)}
    finished = [r for s, r in seen if s == int(JobStatus.Finished)]
    assert len(finished) == 3


def sleeper(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def test_cancel_a_running_job_and_a_queued_one(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    with SharedJobCluster(
        sleeper, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as cluster:
        long = [cluster.submit(30.0) for _ in range(6)]  # 4 CPUs: two wait
        deadline = time.monotonic() + 20
        while sum(job.status == JobStatus.Running for job in long) < 4:
            assert time.monotonic() < deadline, [job.status for job in long]
            time.sleep(0.05)
        for job in long:
            assert cluster.cancel(job) == 0
        assert cluster.wait(timeout=20)
        statuses = {job.status for job in long}
        assert statuses <= {JobStatus.Terminated, JobStatus.Cancelled}
        assert JobStatus.Terminated in statuses
        assert cluster.submit(0.1)() == 0.1  # the CPUs are free again


def test_web_monitor_shows_a_shared_clusters_jobs(
    scheduler: SchedulerProcess, users: dict[str, Path], nodes: LocalCluster
) -> None:
    from dispynb.httpd import DispyHTTPServer
    from tests.httpd.client import MonitorClient

    with SharedJobCluster(
        sleeper, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as cluster:
        server = DispyHTTPServer(cluster, port=0, poll_sec=1)
        try:
            job = cluster.submit(0.01)
            job()
            assert cluster.wait(timeout=WAIT)  # listed (after the job's own waiters)
            reply = MonitorClient(server).get("/api/cluster")
            assert reply.status == 200
            snap = reply.json()
            (record,) = [j for j in snap["jobs"] if j["key"] == job._key]
            assert record["status"] == "Finished"
            # The nodes behind the scheduler, not the scheduler.
            deadline = time.monotonic() + 20
            while len(snap["nodes"]) < 2:
                assert time.monotonic() < deadline, snap["nodes"]
                time.sleep(0.05)
                snap = MonitorClient(server).get("/api/cluster").json()
            shown = sorted(f"{n['ip_addr']}:{n['port']}" for n in snap["nodes"])
            assert shown == sorted(nodes.node_specs())
        finally:
            server.shutdown(wait=False)
