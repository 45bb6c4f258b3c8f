"""A job's own files through the scheduler: `JobCluster.put` objects and a job's
``dispy_job_depends``, which a node places as the job starts and never asks for: the
scheduler must have written them to that node first (W7 through the scheduler hung
with "file ... was not sent to this node" before)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import LocalCluster, SharedJobCluster
from tests.sharedsched.harness import SchedulerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def measure(data: bytes, i: int) -> int:
    return len(data) + i


def read_job_file(name: str) -> str:
    with open(name) as handle:  # the job's own depends, in its directory
        return handle.read()


def run_tool(name: str) -> str:
    import subprocess

    return subprocess.run(
        [f"./{name}"], capture_output=True, text=True, check=True
    ).stdout


def test_put_objects_reach_every_node_through_the_scheduler(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    with SharedJobCluster(
        measure, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as cluster:
        first = cluster.put(b"x" * 100_000)
        jobs = [cluster.submit(first, i) for i in range(16)]  # spread over both nodes
        assert [job() for job in jobs] == [100_000 + i for i in range(16)]
        second = cluster.put(b"y" * 5000)  # a later object, on a used connection
        jobs = [cluster.submit(second, i) for i in range(8)]
        assert [job() for job in jobs] == [5000 + i for i in range(8)]


def test_a_jobs_own_depends_reach_the_node_through_the_scheduler(
    scheduler: SchedulerProcess,
    users: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    for n in range(3):
        (tmp_path / f"in-{n}.txt").write_text(f"content {n}")
    with SharedJobCluster(
        read_job_file,
        scheduler_host=scheduler.address,
        secret_file=str(users["alice"]),
    ) as cluster:
        jobs = [
            cluster.submit(f"in-{n % 3}.txt", dispy_job_depends=[f"in-{n % 3}.txt"])
            for n in range(9)
        ]
        assert [job() for job in jobs] == [f"content {n % 3}" for n in range(9)]


def test_a_long_computation_sends_jobs_own_files_past_the_files_quota(
    nodes: LocalCluster,
    users: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """dispy's pattern through the scheduler: each job with its own file. The
    scheduler keeps a job's file while jobs need it, not until the cluster
    closes: more files, one after the other, than its --max_files quota allows at
    once all run, and a file needed again is sent again."""
    monkeypatch.chdir(tmp_path)
    names = [f"in-{n}.txt" for n in range(6)]
    for n, name in enumerate(names):
        (tmp_path / name).write_text(f"content {n}")
    with (
        SchedulerProcess(
            tmp_path, nodes.node_specs(), nodes.secret, args=("--max_files", "2")
        ) as sched,
        SharedJobCluster(
            read_job_file,
            scheduler_host=sched.address,
            secret_file=str(users["alice"]),
        ) as cluster,
    ):
        results = []
        for name in [*names, names[0]]:
            job = cluster.submit(name, dispy_job_depends=[name])
            results.append(job())
            assert job.exception is None, job.exception
    assert results == [f"content {n}" for n in [*range(6), 0]]


def test_a_jobs_own_program_stays_executable_through_the_scheduler(
    scheduler: SchedulerProcess,
    users: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A program in a job's ``dispy_job_depends`` runs as ``./tool.sh`` on the
    scheduler's nodes (the scheduler relays the entry that says it is one; one
    such entry was unpacked as two items there)."""
    monkeypatch.chdir(tmp_path)
    tool = tmp_path / "job_tool.sh"
    tool.write_text("#!/bin/sh\necho shared job tool ran\n")
    tool.chmod(0o755)
    with SharedJobCluster(
        run_tool, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as cluster:
        jobs = [
            cluster.submit("job_tool.sh", dispy_job_depends=["job_tool.sh"])
            for _ in range(4)  # on both nodes
        ]
        assert all(job.finish.wait(60) for job in jobs), "no result"
    assert [job.result for job in jobs] == ["shared job tool ran\n"] * 4, [
        job.exception for job in jobs
    ]
