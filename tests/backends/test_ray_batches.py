"""dispynb on a real Ray cluster: jobs of microseconds, several per Ray call (a
batch), and what stopping them does. Runs as test_ray.py does (see its docstring)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dispynb import JobCluster
from dispynb.backends.ray import RayEngine
from dispynb.job import DispyJob, JobStatus
from tests.backends.raywork import wait_for

#: Ray's driver keeps its connections to the actors' workers (its cache).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.usefixtures("allow_engine_sockets"),
]


# -- computations (by value, as from a notebook) ------------------------------------


def short(n: int) -> int:
    """A job of microseconds (batched once the engine has seen a few)."""
    if n % 50 == 7:
        raise ValueError(f"bad input {n}")
    print(n)
    return n + 1


def hangs_at(n: int, stuck: int) -> int:
    if n == stuck:
        time.sleep(600)
    return n


def gated(folder: str, n: int) -> int:
    """Job 0 waits for the file ``gate`` in ``folder``; the others take microseconds."""
    if n == 0:
        Path(folder, "running").touch()
        while not Path(folder, "gate").exists():
            time.sleep(0.02)
    return n


# -- tests ----------------------------------------------------------------------------


def test_short_jobs_share_ray_calls_and_keep_their_own_outcomes(
    engine: RayEngine,
) -> None:
    """Jobs of microseconds go to the actors several per Ray call (a batch): each
    still reports Running before its own outcome (result, stdout, exception), and
    cancelling queued ones ends them without touching the others."""
    seen: dict[int, list[str]] = {}
    lock = threading.Lock()

    def record(status: int, node: Any, job: DispyJob | None) -> None:
        if job is not None:
            with lock:
                seen.setdefault(job.id, []).append(JobStatus(status).name)

    with JobCluster(short, engine=engine, cluster_status=record) as cluster:
        for n, job in [(n, cluster.submit(n)) for n in range(110, 130)]:
            assert job() == n + 1  # the engine sees how long the jobs take
        jobs = [cluster.submit_job_id(n, n) for n in range(400)]
        for job in jobs[300:]:
            cluster.cancel(job)
        wait_for(lambda: all(job.done() for job in jobs), "the 400 jobs")
        backend: Any = cluster._backend
        assert backend._batches_sent > 0, "no batch was sent"
    for n, job in enumerate(jobs[:300]):
        if n % 50 == 7:
            assert job.status is JobStatus.Terminated, (n, job.status)
            assert f"bad input {n}" in (job.exception or "")
        else:
            assert job.status is JobStatus.Finished, (n, job.status, job.exception)
            assert job.result == n + 1 and job.stdout == f"{n}\n"
        assert job.start_time is not None and job.end_time is not None
        assert job.start_time <= job.end_time
        names = seen[n]
        assert "Running" in names, (n, names)
        assert names.index("Running") < names.index(job.status.name), (n, names)
    # A cancel reaches a queued job (Cancelled) or comes after it ran (its outcome).
    for job in jobs[300:]:
        assert job.status in (
            JobStatus.Cancelled,
            JobStatus.Finished,
            JobStatus.Terminated,
        ), (job.id, job.status)


def test_a_batched_job_that_hangs_is_stopped_and_its_batch_runs_again(
    engine: RayEngine,
) -> None:
    """A job sent in a batch (its neighbours took microseconds) that hangs: cancel
    ends it Terminated (its actor is killed after a short wait) and, the cluster
    being reentrant, the other jobs of its batch run again and finish."""
    with JobCluster(hangs_at, engine=engine, reentrant=True) as cluster:
        for n, job in [(n, cluster.submit(n, -1)) for n in range(40)]:
            assert job() == n  # the engine sees how long the jobs take
        jobs = [cluster.submit(n, 25) for n in range(200)]
        stuck = jobs[25]
        wait_for(
            lambda: sum(job.done() for job in jobs) >= 150,
            "the jobs that are not behind the stuck one",
        )
        assert not stuck.done()
        started = time.monotonic()
        cluster.cancel(stuck)
        wait_for(lambda: all(job.done() for job in jobs), "the cancel")
        assert time.monotonic() - started < 60
        assert stuck.status is JobStatus.Terminated
        others = [job for job in jobs if job is not stuck]
        assert [job.status for job in others] == [JobStatus.Finished] * 199
        assert [job.result for job in others] == [n for n in range(200) if n != 25]


def test_short_jobs_queued_behind_a_long_one_are_not_cancelled_off_their_actor(
    engine: RayEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Short jobs wait in a deep queue behind a job that runs long, while another
    actor has nothing left to do: the engine leaves them there (no ``ray.cancel``
    of a queued actor call) and every job ends with its own result.

    Ray 2.60 can stall an actor whose queued call was cancelled while more calls
    were queued behind it: the actor waits 30 s for the cancelled call's sequence
    number, then fails all its queued calls with ``ActorUnavailableError``, and the
    engine counted its running job lost (Abandoned, result None: the job of a
    batch that came back None in the CI run after a node joined)."""
    import ray

    cancelled: list[Any] = []
    real_cancel = ray.cancel

    def cancel(ref: Any, *args: Any, **kwargs: Any) -> Any:
        cancelled.append(ref)
        return real_cancel(ref, *args, **kwargs)

    monkeypatch.setattr(ray, "cancel", cancel)
    folder = str(tmp_path)
    with JobCluster(gated, engine=engine) as cluster:
        warm = [cluster.submit(folder, n) for n in range(1, 41)]
        assert [job() for job in warm] == list(range(1, 41))  # jobs of microseconds
        jobs = [cluster.submit(folder, n) for n in range(120)]
        backend: Any = cluster._backend

        async def idle_and_deep() -> bool:
            slots = [s for s in backend._slots if s.ready]
            return any(not s.inflight for s in slots) and any(
                len(s.inflight) > 2 for s in slots
            )

        # The other actor ran all it had; the long job's actor holds the rest.
        wait_for(
            lambda: backend._runner.run_sync(idle_and_deep, timeout=30),
            "an idle actor while jobs wait behind the long one",
        )
        assert not jobs[0].done()
        Path(folder, "gate").touch()
        wait_for(lambda: all(job.done() for job in jobs), "the 120 jobs")
    assert [job.status for job in jobs] == [JobStatus.Finished] * 120
    assert [job.result for job in jobs] == list(range(120))
    assert cancelled == [], "a queued call was cancelled off a deep actor queue"
