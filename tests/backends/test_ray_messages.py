"""dispynb on a real Ray cluster: what jobs send their client (provisional results,
files) and the files they get (``depends``), through the engine's inbox. Runs as
test_ray.py does (see its docstring)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from dispynb import JobCluster
from dispynb.backends.ray import RayEngine
from dispynb.job import DispyJob, JobStatus
from tests.backends.rayhead import RayHead
from tests.backends.raywork import (
    WAIT,
    wait_for,
)

#: Ray's driver keeps its connections to the actors' workers (its cache).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.usefixtures("allow_engine_sockets"),
]


# -- computations (by value, as from a notebook) ------------------------------------


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


def reads_file(name: str) -> str:
    return Path(name).read_text()


def reports_on_file(name: str) -> int:
    """Reads a ``depends`` file, sends its text as a provisional result and a copy
    of it as a file."""
    text = Path(name).read_text()
    dispy_provisional_result(text)  # noqa: F821 (dispy's name on the node)
    Path(f"copy-{name}").write_text(text)
    return dispy_send_file(f"copy-{name}")  # noqa: F821


# -- tests ----------------------------------------------------------------------------


def test_depends_files_are_next_to_the_jobs(engine: RayEngine, tmp_path: Path) -> None:
    data = tmp_path / "input.txt"
    data.write_text("the data")
    with JobCluster(reads_file, depends=[str(data)], engine=engine) as cluster:
        job = cluster.submit("input.txt")
        assert job() == "the data", job.exception


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
