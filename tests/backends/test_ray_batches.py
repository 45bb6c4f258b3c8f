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


def test_short_jobs_queued_behind_a_long_one_run_on_the_idle_actor(
    engine: RayEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Short jobs (batched, many calls in flight per actor) wait behind a job that
    runs long, while the other actor has nothing left to do: the engine takes them
    back (their actor skips them) and the idle actor runs them all while the long
    one still runs; every job ends with its own result, and no queued actor call
    is cancelled with ``ray.cancel``.

    Before, they waited for the long job: taking back was for long jobs only (two
    calls per actor), as ``ray.cancel`` of a call in a deep queue could stall its
    actor (Ray 2.60 waits 30 s for the cancelled call's sequence number, then fails
    the calls queued behind it). The jobs taken back together from an actor (a
    batch's) are asked of it in one Ray call (before, one call per job)."""
    import ray

    cancelled: list[Any] = []
    real_cancel = ray.cancel

    def cancel(ref: Any, *args: Any, **kwargs: Any) -> Any:
        cancelled.append(ref)
        return real_cancel(ref, *args, **kwargs)

    skips: list[tuple[Any, ...]] = []  # the arguments of each skip call

    class CountedSkip:
        def __init__(self, method: Any) -> None:
            self.method = method

        def options(self, **options: Any) -> Any:
            call = self.method.options(**options)

            class Counted:
                def remote(self, *args: Any) -> Any:
                    skips.append(args)
                    return call.remote(*args)

            return Counted()

    monkeypatch.setattr(ray, "cancel", cancel)
    folder = str(tmp_path)
    with JobCluster(gated, engine=engine) as cluster:
        backend: Any = cluster._backend
        for slot in backend._slots:
            monkeypatch.setattr(slot.handle, "skip", CountedSkip(slot.handle.skip))
        warm = [cluster.submit(folder, n) for n in range(1, 41)]
        assert [job() for job in warm] == list(range(1, 41))  # jobs of microseconds
        # The jobs are queued while the loop is held, so that it schedules them all
        # at once: job 0 heads a batch, short jobs are queued behind it on its
        # actor. Submitted one by one as the loop runs, they could all go to the
        # idle actor, leaving nothing behind the long job to take back.
        holding, release = threading.Event(), threading.Event()

        def hold() -> None:
            holding.set()
            release.wait(30)

        backend._runner.call_soon(hold)
        assert holding.wait(30), "the cluster's loop did not run"
        try:
            jobs = [cluster.submit(folder, n) for n in range(120)]
        finally:
            release.set()
        wait_for(
            lambda: all(job.done() for job in jobs[1:]),
            "the short jobs, while the long one runs",
            timeout=60,
        )
        assert not jobs[0].done()
        Path(folder, "gate").touch()
        assert jobs[0]() == 0
        assert backend._batches_sent > 0, "no batch was sent"
    assert [job.status for job in jobs] == [JobStatus.Finished] * 120
    assert [job.result for job in jobs] == list(range(120))
    assert cancelled == [], "a queued call was cancelled with ray.cancel"
    asked = sum(len(args[0]) if isinstance(args[0], list) else 1 for args in skips)
    assert 0 < len(skips) < asked, skips


def held(folder: str, n: int, name: str) -> int:
    """A job of microseconds, or with a ``name``, one that says it runs (file
    ``running-<name>``) and waits for the file ``gate`` in ``folder``."""
    if name:
        Path(folder, f"running-{name}").touch()
        while not Path(folder, "gate").exists():
            time.sleep(0.02)
    return n


def test_a_job_cancelled_in_a_running_batch_before_its_turn_is_skipped(
    engine: RayEngine, tmp_path: Path
) -> None:
    """A job sent in a batch whose first job runs long, cancelled before its turn
    came: it ends Cancelled at once, never runs, and the batch's running job is
    untouched (it ends Finished once it returns). Before, the cancel waited 2 s for
    the batch, then killed its actor: the cancelled job ended Terminated, and the
    running job, another's, Abandoned with its actor's state (setup's globals)."""
    folder = str(tmp_path)
    with JobCluster(held, engine=engine) as cluster:
        warm = [cluster.submit(folder, n, "") for n in range(1, 41)]
        assert [job() for job in warm] == list(range(1, 41))  # jobs of microseconds
        # One actor held by a job alone (a job_timeout: never in a batch), so that
        # no actor is idle to take back the batch's waiting jobs; the other by the
        # first job of a batch.
        alone = cluster.submit(folder, -1, "alone", dispy_job_timeout=300)
        jobs = [cluster.submit(folder, n, "" if n else "batch") for n in range(60)]
        by_key = {job._key: job for job in jobs}
        backend: Any = cluster._backend
        for name in ("alone", "batch"):
            wait_for(Path(folder, f"running-{name}").exists, f"the job {name!r}")

        async def behind_the_long_one() -> list[int]:
            for slot in backend._slots:
                if slot.inflight and slot.inflight[0][0] == jobs[0]._key:
                    ref = slot.inflight[0][2]
                    return [k for k, _, r in list(slot.inflight)[1:] if r is ref]
            return []

        batch: list[int] = []

        def in_a_batch() -> bool:
            batch[:] = backend._runner.run_sync(behind_the_long_one, timeout=30)
            return bool(batch)

        wait_for(in_a_batch, "the long job's batch")
        victim = by_key[batch[-1]]
        cluster.cancel(victim)
        wait_for(victim.done, "the cancel")
        assert victim.status is JobStatus.Cancelled, (victim.status, victim.exception)
        assert not jobs[0].done()
        Path(folder, "gate").touch()
        assert jobs[0]() == 0 and alone() == -1
        others = [job for job in jobs if job is not victim]
        wait_for(lambda: all(job.done() for job in others), "the other jobs")
    assert [job.status for job in others] == [JobStatus.Finished] * 59
    assert [job.result for job in others] == [
        n for n, job in enumerate(jobs) if job is not victim
    ]
    assert victim.result is None
