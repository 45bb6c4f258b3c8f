"""dispynb on a real Ray cluster: jobs stopped (cancel, job_timeout, mem_limit) and
workers lost under their jobs. Runs as test_ray.py does (see its docstring)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import dispynb
from dispynb import JobCluster
from dispynb.backends.ray import RayEngine
from dispynb.job import DispyJob, JobStatus
from tests.backends.raywork import WAIT, record_cleanup, record_setup, wait_for

#: Ray's driver keeps its connections to the actors' workers (its cache).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.usefixtures("allow_engine_sockets"),
]


# -- computations (by value, as from a notebook) ------------------------------------


def sleeper(folder: str, seconds: float) -> int:
    Path(folder, f"running-{os.getpid()}").touch()
    time.sleep(seconds)
    return os.getpid()


def sleeps_in_its_directory(folder: str, seconds: float) -> int:
    """Tells where it runs (its actor's directory), then sleeps."""
    Path(folder, f"path-{os.getpid()}").write_text(dispy_job_path)  # noqa: F821
    time.sleep(seconds)
    return os.getpid()


def gated(folder: str, n: int) -> int:
    """Says it ran (the file ``ran-N``), then waits for the file ``gate``."""
    Path(folder, f"ran-{n}").touch()
    deadline = time.monotonic() + 300
    while not Path(folder, "gate").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return n


def gated_each(folder: str, n: int) -> int:
    """Says it ran (the file ``ran-N``), then waits for the file ``gate-N``."""
    Path(folder, f"ran-{n}").touch()
    deadline = time.monotonic() + 300
    while not Path(folder, f"gate-{n}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return n


def _lose_the_worker() -> None:
    """End the worker's process, leaving its actor's next life nothing to tell (its
    `_rayworker.LIFE` file gone): for the client, as if its node were lost."""
    os.remove(os.path.join(dispy_job_path, ".dispynb-life"))  # noqa: F821
    os.kill(os.getpid(), 9)


def dies_once(folder: str) -> str:
    marker = Path(folder, "died")
    if not marker.exists():
        marker.touch()
        _lose_the_worker()
    return f"ran in {os.getpid()}"


def crashes(folder: str, how: str) -> str:
    """Ends its worker's process by a signal ("segv": a segmentation fault;
    "kill": SIGKILL); "ok": returns. Each run leaves a file ``ran-HOW-N``."""
    Path(folder, f"ran-{how}-{time.monotonic_ns()}").touch()
    if how == "segv":
        import ctypes

        ctypes.string_at(0)
    if how == "kill":
        os.kill(os.getpid(), 9)
    return f"ran in {os.getpid()}"


def exits(code: int) -> str:
    """Ends its worker's process with status ``code`` (0: returns)."""
    if code:
        print("exiting")
        dispy_provisional_result("before the exit")  # type: ignore[name-defined]  # noqa: F821
        os._exit(code)
    return f"ran in {os.getpid()}"


def eats_memory(megabytes: int) -> int:
    """0: the address space the worker has now; else the size of what it took."""
    if not megabytes:
        return int(psutil.Process().memory_info().vms)
    return len(bytearray(megabytes * 1024 * 1024))


#: What a running job stopped by a cancel says: dispynb's nodes' words, then Ray's
#: part (it said "job terminated (cancelled at the client's request): its Ray actor
#: was killed").
STOPPED = (
    "job terminated at the client's request (its Ray actor was killed: Ray restarts "
    "it, and setup runs again)\n"
)


# -- tests ----------------------------------------------------------------------------


def test_cancel_stops_running_and_queued_jobs(
    engine: RayEngine, tmp_path: Path
) -> None:
    """Stop: queued jobs end Cancelled, running ones Terminated (saying so in the
    words of dispynb's nodes, and what it costs on Ray), and the processes that
    ran them are gone; the cluster goes on with new jobs."""
    folder = str(tmp_path)
    with JobCluster(sleeper, engine=engine) as cluster:
        jobs = [cluster.submit(folder, 600) for _ in range(6)]
        wait_for(lambda: len(list(tmp_path.glob("running-*"))) == 2, "2 running jobs")
        pids = [int(p.name.split("-")[1]) for p in tmp_path.glob("running-*")]
        # node_jobs: the two running now, on the head (the node of 127.0.0.1).
        wait_for(lambda: len(cluster.node_jobs("127.0.0.1")) == 2, "node_jobs")
        started = time.monotonic()
        for job in jobs:
            cluster.cancel(job)
        wait_for(lambda: all(job.done() for job in jobs), "the cancels")
        assert time.monotonic() - started < 60
        statuses = sorted(job.status.name for job in jobs)
        assert statuses == ["Cancelled"] * 4 + ["Terminated"] * 2
        stopped = [job.exception for job in jobs if job.status.name == "Terminated"]
        assert stopped == [STOPPED] * 2
        for pid in pids:
            wait_for(lambda pid=pid: not psutil.pid_exists(pid), f"process {pid} gone")
        again = cluster.submit(folder, 0)
        assert again() not in pids and again.status is JobStatus.Finished


@pytest.mark.parametrize("how", ["cluster.cancel", "future.cancel"])
def test_a_job_cancelled_while_it_waits_on_a_busy_actor_never_runs(
    engine: RayEngine, tmp_path: Path, how: str
) -> None:
    """4 jobs on the 2 actors: 2 run, 2 wait on the actors behind them. The 2 that
    wait are cancelled (Stop, ``cluster.cancel``; or ``Future.cancel``): they end
    Cancelled at once, while the others still run, and never run (no ``ran-N``).
    Before, ``ray.cancel`` did not drop a call queued on a busy actor: each ran
    when its turn came and ended Cancelled only then (its file written)."""
    folder = str(tmp_path)
    executor = dispynb.Executor(engine=engine)
    try:
        cluster = executor.cluster
        futures: list[Any] = [executor.submit(gated, folder, n) for n in range(4)]
        backend: Any = cluster._backend

        async def all_on_actors() -> bool:
            return sum(len(slot.inflight) for slot in backend._slots) == 4

        wait_for(lambda: len(list(tmp_path.glob("ran-*"))) == 2, "2 running jobs")
        wait_for(
            lambda: backend._runner.run_sync(all_on_actors, timeout=30),
            "the 2 other jobs waiting on the actors",
        )
        running = {int(p.name.split("-")[1]) for p in tmp_path.glob("ran-*")}
        waiting = [n for n in range(4) if n not in running]
        if how == "cluster.cancel":
            for n in waiting:
                cluster.cancel(futures[n].job)
        else:
            assert [futures[n].cancel() for n in waiting] == [True, True]
        # Settled without waiting for the running jobs (the gate is still shut).
        wait_for(lambda: all(futures[n].done() for n in waiting), "the cancels")
        assert not any(futures[n].done() for n in running)
        Path(folder, "gate").touch()
        for n in running:
            assert futures[n].result(timeout=90) == n
    finally:
        Path(folder, "gate").touch()
        executor.shutdown()
    assert [futures[n].job.status for n in waiting] == [JobStatus.Cancelled] * 2
    assert {p.name for p in tmp_path.glob("ran-*")} == {f"ran-{n}" for n in running}


def test_a_cancel_whose_skip_gets_no_answer_still_stops_its_job(
    engine: RayEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job waiting on a busy actor is cancelled, and its actor's skip fails with
    a Ray error other than a lost actor (here a task that raises in its stead):
    whether it had begun is not known, so it is taken as begun: stopped as a
    running job when its turn comes (Terminated by the cancel), not run to its end.
    Before, the cancel was lost: the job stayed "asked to skip" for good (its
    Running report held), ran to its end and ended Finished."""
    import ray

    @ray.remote(num_cpus=0)  # the actors hold the CPUs
    def no_answer(*args: Any) -> None:
        raise RuntimeError("the skip got no answer (the test's)")

    class FailingSkip:
        def options(self, **options: Any) -> FailingSkip:
            return self

        def remote(self, *args: Any) -> Any:
            return no_answer.remote()

    folder = str(tmp_path)
    with JobCluster(gated_each, engine=engine) as cluster:
        jobs = [cluster.submit_job_id(n, folder, n) for n in range(4)]
        backend: Any = cluster._backend

        async def all_on_actors() -> bool:
            return sum(len(slot.inflight) for slot in backend._slots) == 4

        wait_for(lambda: len(list(tmp_path.glob("ran-*"))) == 2, "2 running jobs")
        wait_for(
            lambda: backend._runner.run_sync(all_on_actors, timeout=30),
            "the 2 other jobs waiting on the actors",
        )
        running = {int(p.name.split("-")[1]) for p in tmp_path.glob("ran-*")}
        victim = jobs[min(n for n in range(4) if n not in running)]
        for slot in backend._slots:
            monkeypatch.setattr(slot.handle, "skip", FailingSkip())
        cluster.cancel(victim)

        async def answered() -> bool:
            return victim._key not in backend._skipping

        wait_for(
            lambda: backend._runner.run_sync(answered, timeout=30),
            "the skip's failure",
            timeout=30,
        )
        for n in running:  # the victim's turn comes: it would wait for its gate
            Path(folder, f"gate-{n}").touch()
        wait_for(victim.done, "the cancelled job")
        for n in range(4):
            Path(folder, f"gate-{n}").touch()
        assert [jobs[n]() for n in running] == sorted(running)
    assert victim.status is JobStatus.Terminated, (victim.status, victim.result)
    assert victim.exception == STOPPED, victim.exception


def _written(folder: Path) -> list[Path]:
    """The ``path-*`` files in ``folder`` that hold their path."""
    return [path for path in folder.glob("path-*") if path.stat().st_size]


def test_a_stopped_jobs_actor_leaves_no_directory_behind(
    engine: RayEngine, tmp_path: Path
) -> None:
    """The actor killed under a stopped job (Ray restarts it) and the actors closed
    with the cluster leave none of their directories (depends files, what the jobs
    wrote) in the worker's temporary folder. Before, each stopped job left its
    actor's directory there for good."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    data = tmp_path / "input.txt"
    data.write_text("the data")
    with JobCluster(
        sleeps_in_its_directory, depends=[str(data)], engine=engine
    ) as cluster:
        stopped = cluster.submit(str(folder), 600)
        # (once written: the job creates the file, then writes it)
        wait_for(lambda: _written(folder), "the job running")
        (written,) = _written(folder)
        directory = Path(written.read_text())
        assert (directory / "input.txt").read_text() == "the data"
        cluster.cancel(stopped)
        assert stopped() is None and stopped.status is JobStatus.Terminated
        for job in [cluster.submit(str(folder), 0) for _ in range(4)]:
            assert job() is not None, job.exception
    paths = {Path(p.read_text()) for p in folder.glob("path-*")}
    assert directory in paths and len(paths) >= 2, paths
    assert [path for path in paths if path.exists()] == []


def test_cleanup_runs_in_the_actors_restarted_after_a_stop(
    engine: RayEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stop both running jobs, then close at once: Ray is restarting their actors
    (setup runs again there), which refused the cleanup call; the user saw
    "cleanup failed on a Ray worker: ... The actor is restarting" and cleanup never
    ran after that second setup. Now it runs in each restarted actor."""
    folder = str(tmp_path)
    cluster = JobCluster(
        sleeper,
        setup=lambda: record_setup(folder),
        cleanup=lambda: record_cleanup(folder),
        engine=engine,
    )
    with caplog.at_level(logging.WARNING, logger="dispynb.backends.ray"):
        try:
            jobs = [cluster.submit(folder, 600) for _ in range(2)]
            wait_for(lambda: len(list(tmp_path.glob("running-*"))) == 2, "2 jobs")
            killed = {p.name.split("-")[1] for p in tmp_path.glob("running-*")}
            for job in jobs:
                cluster.cancel(job)
            for job in jobs:
                job()
            for pid in killed:
                wait_for(lambda pid=pid: not psutil.pid_exists(int(pid)), "the kill")
        finally:
            cluster.close()
    assert [job.status for job in jobs] == [JobStatus.Terminated] * 2
    setups = {p.name.split("-")[1] for p in tmp_path.glob("setup-*")}
    cleanups = {p.name.split("-")[1] for p in tmp_path.glob("cleanup-*")}
    assert len(setups - killed) == 2 and cleanups == setups - killed
    assert "cleanup failed" not in caplog.text


@pytest.fixture
def quick_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose actor's next life says nothing of its death is taken as lost
    after 1 s (not `_raydeaths.LIFE_WAIT`)."""
    monkeypatch.setattr("dispynb.backends._raydeaths.LIFE_WAIT", 1.0)


@pytest.mark.usefixtures("quick_loss")
def test_worker_death_resubmits_reentrant_jobs(
    engine: RayEngine, tmp_path: Path
) -> None:
    """A worker lost under its job (nothing says how it ended: as when its node is
    lost): a reentrant job runs again."""
    with JobCluster(dies_once, reentrant=True, engine=engine) as cluster:
        job = cluster.submit(str(tmp_path))
        result = job()
    assert job.status is JobStatus.Finished, job.exception
    assert result.startswith("ran in ")


def kills_its_worker(n: int) -> int:
    _lose_the_worker()
    return n


@pytest.mark.usefixtures("quick_loss")
def test_a_reentrant_job_killing_its_worker_each_time_ends_after_max_attempts(
    engine: RayEngine,
) -> None:
    """A reentrant job whose worker is lost under it on every attempt (a "poison"
    job) runs ``max_attempts`` times, then ends Abandoned saying so, in the words
    of dispynb's nodes. Before, the Ray engine ignored max_attempts and ran it
    again in each restarted actor, for ever."""
    with JobCluster(
        kills_its_worker, reentrant=True, max_attempts=2, engine=engine
    ) as cluster:
        job = cluster.submit(1)
        assert job.wait(timeout=WAIT), "the job did not end"
        assert job.status is JobStatus.Abandoned, (job.status, job.exception)
        assert str(job.exception).startswith(
            "abandoned after 2 attempts, each lost with its node (127.0.0.1, "
            "127.0.0.1; last: its Ray worker died while it ran ("
        ), job.exception
        assert str(job.exception).endswith(
            "if the job itself kills nodes, fix it; otherwise raise max_attempts "
            "(now 2)"
        ), job.exception


@pytest.mark.usefixtures("quick_loss")
def test_worker_death_abandons_other_jobs(engine: RayEngine, tmp_path: Path) -> None:
    """Like dispy's jobs of a lost node: not reentrant, the job is Abandoned."""
    with JobCluster(dies_once, engine=engine) as cluster:
        job = cluster.submit(str(tmp_path))
        assert job() is None
        assert job.status is JobStatus.Abandoned
        assert "died" in str(job.exception)
        again = cluster.submit(str(tmp_path))  # the marker exists: it runs
        assert again().startswith("ran in ")


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_job_that_calls_os_exit_ends_terminated_saying_so(
    engine: RayEngine, reentrant: bool
) -> None:
    """A job that ends its process with os._exit(3) ends Terminated: "the job's
    worker process exited with status 3", as on dispynb's nodes, and is not run
    again. Before, Ray's words ("The actor ... is unavailable: ... RpcError: RPC
    error: Socket closed ...") and Abandoned; reentrant, the job ran again in
    each restarted actor, for ever. Its provisional result still arrives."""
    seen: list[Any] = []

    def status(job: DispyJob) -> None:
        if job.status == DispyJob.ProvisionalResult:
            seen.append(job.result)

    with JobCluster(
        exits, reentrant=reentrant, job_status=status, engine=engine
    ) as cluster:
        job = cluster.submit(3)
        assert job.wait(timeout=WAIT), "the job did not end"
        assert job.status is JobStatus.Terminated, (job.status, job.exception)
        assert job.exception == (
            "the job's worker process exited with status 3 (the job called "
            "os._exit(); Ray restarts its actor, and setup runs again)\n"
        )
        wait_for(lambda: seen, "the provisional result")
        assert seen == ["before the exit"]
        assert cluster.submit(0)().startswith("ran in ")  # the actor is back


@pytest.mark.parametrize(
    ("how", "reentrant", "limits", "said"),
    [
        (
            "segv",
            False,
            {},
            "the job's worker process was killed by SIGSEGV (11) (Ray restarts its "
            "actor, and setup runs again)\n",
        ),
        (
            "kill",
            True,
            {"dispy_job_mem_limit": 2**40},
            "the job's worker process was killed by SIGKILL (9), or by another "
            "signal it does not catch; it probably exceeded mem_limit of "
            "1099511627776 bytes (mem_limit / dispy_job_mem_limit): give a larger "
            "limit, or None for none (the out-of-memory killer and kill -9 send "
            "SIGKILL; Ray restarts its actor, and setup runs again)\n",
        ),
    ],
)
def test_a_job_killed_by_a_signal_ends_terminated_saying_so(
    engine: RayEngine,
    tmp_path: Path,
    how: str,
    reentrant: bool,
    limits: dict[str, int],
    said: str,
) -> None:
    """A job that crashes its worker (a segmentation fault in an extension) or
    whose worker is SIGKILLed ends Terminated in dispynb's nodes' words ("the job's
    worker process was killed by SIGSEGV (11)"), and is not run again, reentrant
    or not, as on the nodes (with its memory limit, if it had one); a segfault's
    stderr holds the job's frames (faulthandler's report). Before, Abandoned
    (reentrant: run again) with Ray's words: "its Ray worker died while it ran
    (The actor ... is unavailable: The actor is temporarily unavailable: RpcError:
    RPC error: Socket closed ...)"."""
    with JobCluster(crashes, reentrant=reentrant, engine=engine) as cluster:
        job = cluster.submit(str(tmp_path), how, **limits)
        assert job.wait(timeout=WAIT), "the job did not end"
        assert job.status is JobStatus.Terminated, (job.status, job.exception)
        assert job.exception == said
        if how == "segv":
            assert "Fatal Python error: Segmentation fault" in job.stderr, job.stderr
            assert "in crashes\n" in job.stderr, job.stderr
        back = cluster.submit(str(tmp_path), "ok")()  # the actor is back
        assert back is not None and back.startswith("ran in ")
    assert len(list(tmp_path.glob(f"ran-{how}-*"))) == 1  # not run again


def test_job_timeout_terminates_the_job_and_its_worker_comes_back(
    engine: RayEngine, tmp_path: Path
) -> None:
    """``job_timeout`` / ``dispy_job_timeout``: the running job ends Terminated
    (its actor is killed), the next one runs in the restarted worker."""
    folder = str(tmp_path)
    with JobCluster(sleeper, job_timeout=600, engine=engine) as cluster:
        job = cluster.submit(folder, 600, dispy_job_timeout=1.0)
        assert job() is None
        assert job.status is JobStatus.Terminated
        assert job.exception == (  # dispynb's nodes' words, then Ray's part
            "the job ran over its time limit of 1 s (job_timeout / dispy_job_timeout) "
            "and was terminated; give a larger limit, e.g. submit(..., "
            "dispy_job_timeout=2), or None for none (its Ray actor was killed: Ray "
            "restarts it, and setup runs again)\n"
        ), job.exception
        killed = int(next(tmp_path.glob("running-*")).name.split("-")[1])
        wait_for(lambda: not psutil.pid_exists(killed), "the killed worker gone")
        again = cluster.submit(folder, 0)
        assert again() != killed and again.status is JobStatus.Finished


def test_mem_limit_stops_a_job_that_takes_too_much(engine: RayEngine) -> None:
    """``mem_limit`` / ``dispy_job_mem_limit``: a job over its limit gets a
    MemoryError that names the limit; the worker goes on. (The limit is the
    worker's address space, as on dispynb's nodes: a Ray worker maps much already.)"""
    with JobCluster(eats_memory, mem_limit=64 * 2**30, engine=engine) as cluster:
        vms = cluster.submit(0)()
        limit = vms + 256 * 2**20
        job = cluster.submit(1024, dispy_job_mem_limit=limit)
        assert job() is None
        assert job.status is JobStatus.Terminated
        assert "MemoryError" in str(job.exception)
        assert "mem_limit" in str(job.exception)
        small = cluster.submit(1)
        assert small() == 2**20, small.exception


def test_a_setup_that_fails_in_a_restarted_actor_says_so(
    engine: RayEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job is stopped (its actor killed: Ray restarts it and setup runs again)
    and setup now fails there: a warning says so, with setup's traceback, as a
    Dask worker's or a node's failed setup does. Before, nothing: the cluster went
    on with one worker less. Its frames name this file, not <dynamic-code>."""
    folder = str(tmp_path)

    def setup() -> int:
        if Path(folder, "fail").exists():
            raise RuntimeError("the license server is gone")
        return 0

    with (
        caplog.at_level(logging.WARNING, logger="dispynb.backends.ray"),
        JobCluster(sleeper, setup=setup, engine=engine) as cluster,
    ):
        # Both actors set up (each runs a job) before setup fails.
        job, other = cluster.submit(folder, 600), cluster.submit(folder, 2)
        wait_for(lambda: len(list(tmp_path.glob("running-*"))) == 2, "2 jobs")
        Path(folder, "fail").touch()
        cluster.cancel(job)
        assert job() is None and job.status is JobStatus.Terminated
        wait_for(lambda: "the license server is gone" in caplog.text, "the warning")
        assert "setup failed on a Ray worker of node 127.0.0.1, restarted" in (
            caplog.text
        )
        assert "Traceback (most recent call last)" in caplog.text
        assert "in setup\n" in caplog.text
        # This file's name and line, as a local traceback (was <dynamic-code>).
        assert f'File "{__file__}", line ' in caplog.text, caplog.text
        assert "<dynamic-code>" not in caplog.text, caplog.text
        assert other() is not None, other.exception
        assert cluster.submit(folder, 0)() is not None  # the other worker runs on


def test_a_job_submitted_once_no_worker_is_left_is_abandoned_not_kept(
    engine: RayEngine, tmp_path: Path
) -> None:
    """Both actors' setup fails after their jobs were stopped: the jobs waiting
    then end Abandoned ("no Ray worker is left to run it: ..."), and so does one
    submitted afterwards, at once, as on dispynb's nodes when none is left. Before,
    that one waited for ever (job() never returned)."""
    folder = str(tmp_path)

    def setup() -> int:
        if Path(folder, "fail").exists():
            raise RuntimeError("the license server is gone")
        return 0

    with JobCluster(sleeper, setup=setup, engine=engine) as cluster:
        jobs = [cluster.submit(folder, 600) for _ in range(2)]
        wait_for(lambda: len(list(tmp_path.glob("running-*"))) == 2, "2 jobs")
        queued = cluster.submit(folder, 0)
        Path(folder, "fail").touch()
        for job in jobs:
            cluster.cancel(job)
        assert queued.wait(timeout=WAIT), "the queued job did not end"
        late = cluster.submit(folder, 0)
        assert late.wait(timeout=WAIT), "the job submitted late did not end"
    for job in (queued, late):
        assert job.status is JobStatus.Abandoned, (job.status, job.exception)
        assert str(job.exception) == (
            "no Ray worker is left to run it: setup raised RuntimeError: the "
            "license server is gone"
        ), job.exception
