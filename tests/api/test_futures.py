"""Tests of `dispynb.futures`: ``job.future`` and the futures methods of `DispyJob`.

Unit tests drive a `DispyJob` by hand; the ``slow`` ones run jobs on a local node
and use the futures as `concurrent.futures` and asyncio code does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import pickle
import sys
import threading
import warnings

import pytest

from dispynb import JobCluster, LocalCluster
from dispynb.errors import NodeLostError, RemoteError
from dispynb.job import DispyJob, JobStatus
from tests.jobs import (
    WAIT,
    mark_and_hold,
    raise_value_error,
    square,
    wait_for_path,
    wait_until,
)

TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "<dynamic-code>", line 2, in f\n'
    "ZeroDivisionError: division by zero\n"
)


def make_job() -> DispyJob:
    return DispyJob(None, (), {})


# -- unit: the mapping from a job's end to its future ---------------------------------


def test_finished_job_gives_its_result_and_dispy_attributes_stay():
    job = make_job()
    future = job.future
    assert not future.done() and not job.done()
    job._complete(JobStatus.Finished, result=42)
    assert future.result(0) == 42
    assert future.exception(0) is None
    assert job.result == 42 and job.exception is None  # dispy's attributes
    assert job.future is future


def test_repr_says_what_a_futures_does_and_names_the_job():
    """As `concurrent.futures.Future`'s repr (in its callbacks' error logs, say):
    the state in its words, what it returned or raised; it showed the internal
    state constant ('state=FINISHED') and neither."""
    job = make_job()
    start = f"<JobFuture at {id(job.future):#x} state="
    assert repr(job.future) == f"{start}pending job={job.id!r}>"
    job._complete(JobStatus.Finished, result=42)
    assert repr(job.future) == f"{start}finished returned int job={job.id!r}>"
    failed = make_job()
    failed._complete(JobStatus.Terminated, exception=TRACEBACK)
    assert "state=finished raised RemoteError" in repr(failed.future)


def test_raised_job_result_raises_remote_error_with_the_remote_traceback():
    job = make_job()
    job._complete(JobStatus.Terminated, exception=TRACEBACK)  # future made after
    with pytest.raises(RemoteError) as info:
        job.future.result(0)
    error = info.value
    assert (error.ename, error.evalue) == ("ZeroDivisionError", "division by zero")
    assert error.traceback == TRACEBACK
    assert "Remote traceback" in str(error) and "in f" in str(error)
    assert error._render_traceback_()[-1] == "ZeroDivisionError: division by zero"
    assert job.exception == TRACEBACK  # still dispy's text


def test_terminated_job_without_traceback_names_the_reason():
    job = make_job()
    future = job.future
    job._complete(JobStatus.Terminated, exception="the job ran longer than 2 s")
    error = future.exception(0)
    assert isinstance(error, RemoteError)
    assert (error.ename, error.evalue) == ("Terminated", "the job ran longer than 2 s")


def test_a_job_failed_as_a_whole_says_which_job_where_why_and_what_to_do():
    """It read "Terminated: the job's worker process was killed by SIGKILL (9)":
    a status for a head, neither the job nor its node, and no advice."""
    reason = "the job's worker process was killed by SIGKILL (9)"
    job = DispyJob("fit-3", (), {})
    future = job.future
    job._complete(JobStatus.Terminated, exception=reason, ip_addr="10.0.0.7")
    error = future.exception(0)
    assert isinstance(error, RemoteError)
    said = str(error)
    assert said.startswith(
        f"job 'fit-3' on node 10.0.0.7 failed (Terminated): {reason}\n"
    ), said
    assert "out-of-memory killer" in said and "mem_limit" in said, said
    assert (error.ename, error.evalue) == ("Terminated", reason)  # as before
    assert str(pickle.loads(pickle.dumps(error))) == said


def test_abandoned_job_raises_node_lost_error_with_the_reason():
    job = make_job()
    future = job.future
    job._complete(JobStatus.Abandoned, exception="node 10.0.0.5:9711 was lost")
    with pytest.raises(NodeLostError, match=r"10\.0\.0\.5:9711 was lost") as info:
        future.result(0)
    # Which job did not finish, as a Terminated one's error says (it named none).
    assert str(info.value) == (
        f"job {job.id!r} did not finish: node 10.0.0.5:9711 was lost"
    ), info.value


def test_cancelled_job_cancels_its_future_for_wait_and_as_completed():
    job = make_job()
    future = job.future
    job._complete(JobStatus.Cancelled, exception="cancelled before it ran")
    assert future.cancelled()
    with pytest.raises(cf.CancelledError):
        future.result(0)
    assert cf.wait([future], timeout=0).done == {future}
    assert list(cf.as_completed([future], timeout=0)) == [future]


def test_cancel_pending_job_without_cluster_ends_it_cancelled():
    job = make_job()
    assert job.cancel() is True
    assert job.status == JobStatus.Cancelled and job.future.cancelled()
    assert job.cancel() is True  # again: still cancelled, nothing else happens
    assert cf.wait([job.future], timeout=0).done == {job.future}


def test_running_or_done_job_cannot_be_cancelled():
    job = make_job()
    job._set_running("10.0.0.5")
    assert job.future.running()
    assert job.cancel() is False and job.status == JobStatus.Running
    job._complete(JobStatus.Finished, result=1)
    assert job.cancel() is False and job.future.result(0) == 1


def test_future_made_while_running_is_running():
    job = make_job()
    job._set_running("10.0.0.5")
    assert job.future.running()


def test_timeouts_raise_timeout_error():
    job = make_job()
    with pytest.raises(TimeoutError):
        job.future.result(timeout=0.01)
    with pytest.raises(TimeoutError):
        job.future.exception(timeout=0.01)


def test_done_callbacks_get_the_job_and_the_future_once_each():
    job = make_job()
    got: list[object] = []
    job.add_done_callback(got.append)
    job.future.add_done_callback(got.append)
    job._complete(JobStatus.Finished, result=1)
    job._complete(JobStatus.Finished, result=2)  # a late duplicate: ignored
    assert got == [job, job.future]
    job.add_done_callback(got.append)  # already done: called at once
    assert got[-1] is job


def test_a_failing_callback_is_logged_and_the_next_runs(caplog, allow_error_logs):
    job = make_job()
    got: list[object] = []
    job.add_done_callback(lambda _job: 1 / 0)
    job.add_done_callback(got.append)
    job._complete(JobStatus.Finished, result=1)
    assert got == [job]
    assert any("callback" in r.getMessage() for r in allow_error_logs)


def test_a_failing_callback_is_logged_as_concurrent_futures_logs_its_own(
    caplog, allow_error_logs
):
    """Under the stdlib's logger, in its words: a program's logging set up for
    `concurrent.futures` covers a JobFuture's callbacks too (before: under
    'dispynb.futures')."""
    job = make_job()
    job.future.add_done_callback(lambda _future: 1 / 0)
    job._complete(JobStatus.Finished, result=1)
    plain: cf.Future[int] = cf.Future()
    plain.add_done_callback(lambda _future: 1 / 0)
    plain.set_result(1)
    ours, theirs = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert ours.name == theirs.name == "concurrent.futures"
    assert ours.getMessage() == f"exception calling callback for {job.future!r}"
    assert theirs.getMessage() == f"exception calling callback for {plain!r}"
    assert ours.exc_info is not None and ours.exc_info[0] is ZeroDivisionError


def test_result_from_many_threads_at_once():
    job = make_job()
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(job.future.result(WAIT)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    job._complete(JobStatus.Finished, result="x")
    for thread in threads:
        thread.join(WAIT)
    assert results == ["x"] * 8


def test_remote_error_pickles_and_parses_a_dotted_name():
    import pickle

    text = "Traceback (most recent call last):\nmod.Custom: it broke\n"
    error = pickle.loads(pickle.dumps(RemoteError.from_text(text)))
    assert (error.ename, error.evalue, error.traceback) == (
        "mod.Custom",
        "it broke",
        text,
    )


# -- with a node ---------------------------------------------------------------------


# Function-scoped: a computation's processes on the node end with each test.
@pytest.fixture
def cluster(local1: LocalCluster):
    with JobCluster(mark_and_hold, nodes=local1) as cluster:
        yield cluster


@pytest.fixture
def squares(local1: LocalCluster):
    with JobCluster(square, nodes=local1) as cluster:
        yield cluster


@pytest.mark.slow
def test_a_callback_raising_system_exit_is_logged_and_the_next_run(
    local1, allow_error_logs
):
    """A done callback or a job_status callback that calls sys.exit() (a
    BaseException) on the callback thread is logged, as one that raises: it
    ended that thread, so no later callback ran and closing the cluster hung."""
    statuses: list[int] = []

    def exit_on_finished(job: DispyJob) -> None:
        statuses.append(job.status)
        if job.status == JobStatus.Finished:
            sys.exit(5)

    with JobCluster(square, nodes=local1, job_status=exit_on_finished) as cluster:
        first = cluster.submit(2)
        first.future.add_done_callback(lambda _future: sys.exit(6))
        assert first() == 4
        second = cluster.submit(3)
        ran = threading.Event()
        second.future.add_done_callback(lambda _future: ran.set())
        assert second() == 9 and ran.wait(WAIT)
    assert statuses.count(JobStatus.Finished) == 2
    logged = [r for r in allow_error_logs if r.exc_info and r.exc_info[0] is SystemExit]
    assert len(logged) == 3, allow_error_logs


@pytest.mark.slow
def test_job_future_result_and_wait_on_real_jobs(squares):
    jobs = [squares.submit(i) for i in range(6)]
    _done, not_done = cf.wait([job.future for job in jobs], timeout=WAIT)
    assert not not_done
    assert [job.future.result() for job in jobs] == [i * i for i in range(6)]
    assert [job() for job in jobs] == [i * i for i in range(6)]  # dispy's way too
    assert sorted(f.result() for f in cf.as_completed([j.future for j in jobs])) == [
        i * i for i in range(6)
    ]


@pytest.mark.slow
def test_remote_exception_renders_the_remote_traceback(local1):
    with JobCluster(raise_value_error, nodes=local1) as cluster:
        job = cluster.submit("bad input")
        with pytest.raises(RemoteError) as info:
            job.future.result(WAIT)
    assert info.value.ename == "ValueError"
    assert "bad input" in info.value.evalue
    assert "raise_value_error" in info.value.traceback
    assert job.status == JobStatus.Terminated and "ValueError" in job.exception


def warn_and_return(x: int) -> int:
    warnings.warn(f"careful {x}", stacklevel=1)
    return x


@pytest.mark.slow
def test_a_jobs_warnings_name_the_computations_file_and_line(local1):
    """``job.stderr`` shows a warning as Python prints it here: the file, line
    and source line of the computation (sent by value: ``<dynamic-code>:N``
    on the node)."""
    line = warn_and_return.__code__.co_firstlineno + 1
    with JobCluster(warn_and_return, nodes=local1) as cluster:
        job = cluster.submit(3)
        assert job() == 3
    assert job.stderr == (
        f"{__file__}:{line}: UserWarning: careful 3\n"
        '  warnings.warn(f"careful {x}", stacklevel=1)\n'
    )


def scheduler_state(cluster: JobCluster):  # type: ignore[no-untyped-def]
    """Where the client holds its jobs (to tell held jobs from jobs sent ahead)."""
    return cluster._backend.driver.state  # the node-server engine's scheduler


@pytest.mark.slow
def test_cancel_a_job_held_by_the_client(cluster, tmp_path):
    release = str(tmp_path / "release")
    running = cluster.submit(str(tmp_path / "started"), release)
    wait_for_path(tmp_path / "started")
    # One CPU: one job waits on the node behind ``running``, the next on the client.
    ahead = cluster.submit(str(tmp_path / "ahead"), release)
    held = cluster.submit(str(tmp_path / "never"), release)
    state = scheduler_state(cluster)
    wait_until(lambda: state.is_known(ahead._key) and state.is_known(held._key))
    assert state.is_queued(held._key) and not state.is_queued(ahead._key)
    assert held.cancel() is True
    # Settled before cancel() returned: it can never run.
    assert held.status == JobStatus.Cancelled and held.future.cancelled()
    assert "before it ran" in held.exception
    open(release, "w").close()
    assert running.future.result(WAIT) > 0 and ahead.future.result(WAIT) > 0
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_cancel_a_job_waiting_on_its_node(cluster, tmp_path):
    """cancel() of a job sent ahead to a node answers True only once the node has
    dropped it: the job is already ``Cancelled`` when cancel() returns, so
    releasing the CPU at once cannot let it run."""
    release = str(tmp_path / "release")
    running = cluster.submit(str(tmp_path / "started"), release)
    wait_for_path(tmp_path / "started")
    queued = cluster.submit(str(tmp_path / "never"), release)
    state = scheduler_state(cluster)
    wait_until(lambda: state.is_known(queued._key) and not state.is_queued(queued._key))
    called: list[object] = []
    queued.future.add_done_callback(called.append)
    assert queued.cancel() is True
    assert queued.status == JobStatus.Cancelled and queued.future.cancelled()
    assert "at the client's request" in queued.exception  # the node dropped it
    open(release, "w").close()  # at once: no waiting for anything to settle
    assert running.future.result(WAIT) > 0
    assert running.cancel() is False
    with pytest.raises(cf.CancelledError):
        queued.future.result(0)
    assert cluster.wait(timeout=WAIT)
    wait_until(lambda: len(called) == 1)
    assert called == [queued.future]  # once
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_cancel_a_job_sent_ahead_to_a_busy_worker_answers_while_that_one_runs(
    cluster, tmp_path
):
    """cancel() of a job the node sent ahead to its busy worker (it does so once
    jobs are seen to be short) answers True while the job before it still runs:
    the worker has not ended that one (the node has nothing from it), so it reads
    the Skip before it would start this one. It used to wait for the worker's own
    word, given once the running job ended: CANCEL_WAIT (30 s), then False."""
    warmup = [
        cluster.submit(str(tmp_path / f"quick{i}"), str(tmp_path)) for i in range(5)
    ]
    assert cluster.wait(timeout=WAIT)
    assert {job.status for job in warmup} == {JobStatus.Finished}
    release = str(tmp_path / "release")
    running = cluster.submit(str(tmp_path / "started"), release, 60)
    wait_for_path(tmp_path / "started")
    queued = cluster.submit(str(tmp_path / "never"), release)
    state = scheduler_state(cluster)
    wait_until(lambda: state.is_known(queued._key) and not state.is_queued(queued._key))
    assert queued.cancel() is True
    assert queued.status == JobStatus.Cancelled and queued.future.cancelled()
    assert not running.done()
    open(release, "w").close()
    assert running.future.result(WAIT) > 0
    assert cluster.wait(timeout=WAIT)
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_cancel_a_job_started_on_its_node_before_the_client_heard(cluster, tmp_path):
    """The job runs on the node, its start maybe not yet reported: cancel() asks
    the node, which lets it run, and answers False; the job ends with its result."""
    release = str(tmp_path / "release")
    job = cluster.submit(str(tmp_path / "started"), release)
    wait_for_path(tmp_path / "started")  # not waiting for job.future.running()
    assert job.cancel() is False
    assert job.future.running() and not job.future.cancelled()
    open(release, "w").close()
    assert job.future.result(WAIT) > 0 and job.status == JobStatus.Finished


@pytest.mark.slow
def test_cancel_futures_cancels_many_with_one_wait(cluster, tmp_path):
    from dispynb.futures import cancel_futures

    release = str(tmp_path / "release")
    running = cluster.submit(str(tmp_path / "started"), release)
    wait_for_path(tmp_path / "started")
    others = [cluster.submit(str(tmp_path / f"never{i}"), release) for i in range(5)]
    plain: cf.Future[int] = cf.Future()
    answers = cancel_futures([running.future, *(j.future for j in others), plain])
    assert answers == [False, True, True, True, True, True, True]
    assert all(job.status == JobStatus.Cancelled for job in others)
    open(release, "w").close()
    assert running.future.result(WAIT) > 0
    assert not list(tmp_path.glob("never*"))


@pytest.mark.slow
def test_running_job_future_refuses_cancel(cluster, tmp_path):
    release = str(tmp_path / "release")
    job = cluster.submit(str(tmp_path / "started"), release)
    wait_for_path(tmp_path / "started")
    wait_until(job.future.running)  # the node reports the start
    assert job.future.cancel() is False
    open(release, "w").close()
    assert job.future.result(WAIT) > 0 and job.status == JobStatus.Finished


@pytest.mark.slow
def test_callbacks_run_off_the_io_thread(squares):
    threads: list[str] = []
    done = threading.Event()

    def record(_job: DispyJob) -> None:
        threads.append(threading.current_thread().name)
        done.set()

    job = squares.submit(3)
    job.add_done_callback(record)
    assert done.wait(WAIT)
    assert threads and threads[0] != "dispynb-io"


@pytest.mark.slow
def test_await_job_and_its_future_in_asyncio_code(squares):
    async def main() -> list[int]:
        first, second = squares.submit(5), squares.submit(6)
        wrapped = asyncio.wrap_future(squares.submit(7).future)
        return [await first, await second.future, await wrapped]

    assert asyncio.run(main()) == [25, 36, 49]


@pytest.mark.slow
def test_await_job_from_a_running_loop_in_another_thread(squares):
    """A notebook cell runs in the kernel's running loop: ``await job`` must not
    block that loop (another task runs meanwhile)."""

    async def cell() -> tuple[int, bool]:
        ticked = asyncio.Event()

        async def ticker() -> None:
            ticked.set()

        task = asyncio.ensure_future(ticker())
        value = await squares.submit(9)
        await task
        return value, ticked.is_set()

    assert asyncio.run(cell()) == (81, True)


def exit_worker(code: int) -> None:
    import os

    os._exit(code)


@pytest.mark.slow
def test_crashed_job_future_raises_remote_error_with_the_nodes_reason(local1):
    """RemoteError covers a job whose worker died (not only one that raised)."""
    with JobCluster(exit_worker, nodes=local1) as cluster:
        job = cluster.submit(3)
        with pytest.raises(RemoteError) as info:
            job.future.result(WAIT)
    assert job.status == JobStatus.Terminated
    assert info.value.ename == "Terminated"
    assert "exited with status 3" in info.value.evalue


@pytest.mark.slow
def test_job_on_a_killed_node_future_raises_node_lost_error(tmp_path):
    from tests.nodeproc import running_node

    release = str(tmp_path / "release")
    with (
        running_node(tmp_path / "a", name="a") as node,
        JobCluster(
            mark_and_hold, nodes=[node.spec], secret=node.secret, pulse_interval=0.2
        ) as cluster,
    ):
        job = cluster.submit(str(tmp_path / "started"), release)
        wait_for_path(tmp_path / "started")
        node.proc.kill()
        with pytest.raises(NodeLostError, match=f"node {node.spec} was lost"):
            job.future.result(WAIT)
        assert job.status == JobStatus.Abandoned


def quick_or_held(marker: str | None, release: str = "") -> float:
    """1.0 at once without a marker; else `mark_and_hold`."""
    if marker is None:
        return 1.0
    return mark_and_hold(marker, release)


@pytest.mark.slow
def test_cancel_racing_the_worker_that_just_began_the_job_returns_false(tmp_path):
    """The node still counts a job as sent ahead while its worker has begun it
    (the worker's word is on its way): cancel() must then answer False and the
    job end with its result, not True for a job that runs.

    The node server is stopped (SIGSTOP) while its worker ends one job and begins
    the next, and the cancel of that next job reaches it with the worker's news.
    """
    import signal

    from tests.nodeproc import running_node

    first, second = tmp_path / "release1", tmp_path / "release2"
    with (
        running_node(tmp_path / "a", name="a") as node,
        JobCluster(
            quick_or_held, nodes=[node.spec], secret=node.secret, pulse_interval=5
        ) as cluster,
    ):
        # Quick jobs first: a node sends jobs ahead to a busy worker only once
        # it knows its jobs are short (microseconds here).
        quick = [cluster.submit(None) for _ in range(20)]
        assert all(job.future.result(WAIT) == 1.0 for job in quick)
        one = cluster.submit(str(tmp_path / "started1"), str(first))
        wait_for_path(tmp_path / "started1")
        two = cluster.submit(str(tmp_path / "started2"), str(second))
        state = scheduler_state(cluster)
        wait_until(lambda: state.is_known(two._key) and not state.is_queued(two._key))
        # A round trip after ``two``'s submission: the node has taken ``two`` (and
        # sent it ahead to the busy worker) before it answers this.
        (tmp_path / "mark").touch()
        assert cluster.send_file(str(tmp_path / "mark"), cluster.status().nodes[0]) == 0
        answers: list[bool] = []
        node.proc.send_signal(signal.SIGSTOP)
        try:
            first.touch()  # the worker ends ``one`` and begins ``two``
            wait_for_path(tmp_path / "started2")
            asking = threading.Thread(target=lambda: answers.append(two.cancel()))
            asking.start()
            # The cancel is written to the node's socket (the state records it).
            wait_until(lambda: state._jobs[two._key].unstarted_cancel)
        finally:
            node.proc.send_signal(signal.SIGCONT)
        second.touch()
        asking.join(WAIT)
        assert answers == [False]
        assert one.future.result(WAIT) > 0
        assert two.future.result(WAIT) > 0 and two.status == JobStatus.Finished
