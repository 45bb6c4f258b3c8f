"""End-to-end tests of `JobCluster` with real node processes on 127.0.0.1.

Most tests share the module's `LocalCluster` nodes (``local``: 2 CPUs, ``local1``: 1
CPU; see conftest.py); tests that need a node of their own start one from the
command line (tests/nodeproc.py). Every wait is bounded; jobs that must be seen to
run write a marker file that the test waits for.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pickle
import re
import signal
import threading
import time
import traceback
from pathlib import Path

import psutil
import pytest

from dispynb import DispyJob, DispyNode, JobCluster, LocalCluster
from dispynb.errors import (
    ClusterError,
    SerializationError,
)
from dispynb.futures import cancel_futures
from tests import jobs
from tests.jobs import WAIT, logged_pids, read_pid, wait_for_path, wait_until

pytestmark = pytest.mark.slow

#: A crash or a cancel must be reported within this many seconds.
PROMPT = 5.0


# --- results ------------------------------------------------------------------


def test_jobcluster_submit_returns_result_output_times_and_node(local):
    before = time.time()
    with JobCluster(jobs.echo, nodes=local) as cluster:
        job = cluster.submit(7)
        assert job.wait(timeout=WAIT)
        after = time.time()
        assert job() == 7
        assert job.status == DispyJob.Finished == 11
        assert job.stdout == "out 7\n"
        assert job.stderr == "err 7\n"
        assert job.exception is None
        assert before <= job.start_time <= job.end_time <= after
        assert job.ip_addr == "127.0.0.1"
        assert job.finish.is_set()


def test_jobcluster_many_jobs_all_results_correct_and_counted(local, capsys):
    with JobCluster(jobs.square, nodes=local) as cluster:
        submitted = [cluster.submit_job_id(f"job-{i}", i) for i in range(500)]
        assert cluster() is True  # __call__ is wait
        assert [job.id for job in submitted] == [f"job-{i}" for i in range(500)]
        assert [job.result for job in submitted] == [i * i for i in range(500)]
        assert {job.status for job in submitted} == {DispyJob.Finished}
        assert cluster.wait(timeout=WAIT) is True

        status = cluster.status()
        assert status.jobs_pending == 0
        assert len(status.nodes) == 1
        node = status.nodes[0]
        assert isinstance(node, DispyNode)
        assert (node.ip_addr, node.port) == local.addresses[0]
        assert node.name == "local-0"
        assert node.cpus == 2
        assert node.jobs_done == 500
        assert node.busy == 0

        capsys.readouterr()
        cluster.print_status()
        out = capsys.readouterr().out
    row = re.search(r"^ {9}local-0 \| {5}2 \| {5}500 \|", out, re.M)  # dispy's
    assert row, out
    assert re.search(r"Total job time: [\d.]+ sec, wall time: [\d.]+ sec", out), out
    sent, received = re.search(
        r"local-0 .*\|\s*([\d.]+ [BKMG])\s*\|\s*([\d.]+ [BKMG])\s*$", out, re.M
    ).groups()
    assert sent != "0 B" and received != "0 B"


def test_jobcluster_wait_with_timeout_on_running_job_returns_false(local, tmp_path):
    marker = tmp_path / "started"
    with JobCluster(jobs.mark_and_sleep, nodes=local) as cluster:
        job = cluster.submit(str(marker), 60)
        wait_for_path(marker)
        assert cluster.wait(timeout=0.1) is False
        assert cluster.status().jobs_pending == 1
        assert cluster.cancel(job) == 0
        assert cluster.wait(timeout=PROMPT) is True
        assert cluster.status().jobs_pending == 0


def test_jobcluster_wait_with_timeout_counts_the_callbacks_in_its_timeout(
    local, tmp_path
):
    # wait() also waits for the job_status callbacks of the jobs done; its timeout
    # bounds both together (it gave each the whole timeout: up to twice as long).
    marker, release = tmp_path / "started", threading.Event()
    timeout = 4.0
    with JobCluster(
        jobs.mark_and_sleep, nodes=local, job_status=lambda job: release.wait(WAIT)
    ) as cluster:
        try:
            cluster.submit(str(marker), timeout / 2)
            wait_for_path(marker)
            start = time.monotonic()
            cluster.wait(timeout=timeout)
            took = time.monotonic() - start
        finally:
            release.set()
        assert cluster.wait(timeout=WAIT) is True
    assert took < timeout + 1, f"wait(timeout={timeout}) took {took:.1f} s"


# --- functions travel by value ------------------------------------------------


def test_jobcluster_function_defined_in_test_with_closure_helper_and_class_runs(local):
    offset = 100  # a closure variable

    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

        def norm2(self) -> int:
            return self.x * self.x

    def helper(point: Point) -> Point:
        return Point(point.norm2() + offset)

    def compute(x: int) -> tuple[Point, int]:
        return helper(Point(x)), os.getpid()

    with JobCluster(compute, nodes=local) as cluster:
        submitted = [cluster.submit(i) for i in range(10)]
        assert cluster.wait(timeout=WAIT)
    assert {job.status for job in submitted} == {DispyJob.Finished}, [
        job.exception for job in submitted
    ]
    assert [job.result[0].x for job in submitted] == [i * i + 100 for i in range(10)]
    assert all(type(job.result[0]).__name__ == "Point" for job in submitted)
    pids = {job.result[1] for job in submitted}
    assert os.getpid() not in pids
    assert not pids & set(local.pids)  # jobs never run in the node server process


def test_jobcluster_function_from_separate_test_module_runs_by_value(local):
    with JobCluster(jobs.evaluate, nodes=local) as cluster:
        submitted = [cluster.submit(x) for x in range(5)]
        assert cluster.wait(timeout=WAIT)
    assert [job.result for job in submitted] == [
        (1 + 2 * x + 3 * x * x + 1000, False) for x in range(5)
    ], [job.exception for job in submitted]


# --- crashes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "fragments"),
    [
        ("raise", ["Traceback", "misbehave", "raise_value_error", "ValueError"]),
        ("sys_exit", ["SystemExit", "sys.exit(3)"]),
        ("os_exit", ["exited with status 3"]),
        ("segfault", ["SIGSEGV"]),
        ("sigkill", ["SIGKILL"]),
        ("lock_result", ["'lock'", "cannot be pickled"]),
        ("generator_result", ["'generator'", "cannot be pickled"]),
    ],
)
def test_jobcluster_job_crash_reported_terminated_and_node_keeps_serving(
    local, kind, fragments
):
    with JobCluster(jobs.misbehave, nodes=local) as cluster:
        job = cluster.submit(kind)
        assert job.wait(timeout=PROMPT), f"crash {kind!r} not reported in {PROMPT} s"
        assert job.status == DispyJob.Terminated == 9
        assert job.result is None
        assert isinstance(job.exception, str)
        for fragment in fragments:
            assert fragment in job.exception, job.exception
        if kind == "raise":
            assert "ValueError: bad value 42" in job.exception
        # More jobs than CPUs, so that a replaced worker must take some of them.
        after = [cluster.submit("ok") for _ in range(6)]
        assert cluster.wait(timeout=WAIT)
        assert [(j.status, j.result) for j in after] == [(DispyJob.Finished, "ok")] * 6


def test_jobcluster_worker_killed_job_sent_ahead_to_it_still_runs(local1, tmp_path):
    """A job waiting at a worker whose job dies is run by the replacement worker."""
    marker = tmp_path / "long"
    with JobCluster(jobs.mark_and_sleep, nodes=local1) as cluster:
        long = cluster.submit(str(marker), 60)
        wait_for_path(marker)
        ahead = cluster.submit(str(tmp_path / "ahead"), 0)  # 1 CPU: sent ahead
        os.kill(read_pid(marker), signal.SIGKILL)  # as the OOM killer would
        assert long.wait(timeout=PROMPT)
        assert long.status == DispyJob.Terminated
        assert "SIGKILL" in long.exception
        assert ahead.wait(timeout=WAIT)
        assert ahead.status == DispyJob.Finished, ahead.exception
        assert (tmp_path / "ahead").exists()


def test_jobcluster_new_computation_short_job_behind_long_one_uses_idle_cpu(tmp_path):
    """Jobs are not sent ahead to a busy worker while another CPU is idle.

    A fresh node, so that the jobs may reach it before all its workers are up.
    """
    with (
        LocalCluster(cpus=2) as local,
        JobCluster(jobs.mark_and_sleep, nodes=local) as cluster,
    ):
        long = cluster.submit(str(tmp_path / "long"), 60)
        short = cluster.submit(str(tmp_path / "short"), 0)
        assert short.wait(timeout=PROMPT), "the short job waited for the long one"
        assert short.status == DispyJob.Finished
        wait_for_path(tmp_path / "long")  # the long job starts on the other worker
        assert short.result != read_pid(tmp_path / "long")
        assert cluster.cancel(long) == 0


def test_jobcluster_submit_from_many_threads_at_once_runs_every_job_once(local):
    """Submitting threads send jobs themselves while the I/O loop is idle, or hand
    them to it when busy: from several threads at once, nothing is lost or doubled."""
    with JobCluster(jobs.square, nodes=local) as cluster:
        results: dict[int, list[int | None]] = {}
        errors: list[BaseException] = []

        def submitter(base: int) -> None:
            try:
                got = results[base] = []
                for x in range(base, base + 50):  # one at a time: the loop idles
                    got.append(cluster.submit(x)())
                burst = [cluster.submit(x) for x in range(base + 50, base + 150)]
                got.extend(job() for job in burst)
            except BaseException as exc:  # reported by the test's thread
                errors.append(exc)

        threads = [
            threading.Thread(target=submitter, args=(1000 * i,)) for i in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT * 4)
        assert not errors
        assert results == {
            1000 * i: [x * x for x in range(1000 * i, 1000 * i + 150)] for i in range(4)
        }
        # Nothing left pending: counted once each job's own waiters woke.
        assert cluster.wait(timeout=WAIT)
        assert sum(node.jobs_done for node in cluster.status().nodes) == 600


@pytest.mark.parametrize(
    "argument, kind",
    [
        (threading.Lock(), "lock"),
        ((i for i in range(3)), "generator"),
    ],
)
def test_jobcluster_submit_unpicklable_argument_says_which_and_what_to_send(
    local, argument, kind
):
    """The message names the argument, its type and what to send instead, and the
    traceback ends at submit: no chained error about the tuple of all arguments,
    no frames of the backend that pickled them."""
    with JobCluster(jobs.square, nodes=local) as cluster:
        with pytest.raises(SerializationError) as raised:
            cluster.submit(argument)
        assert cluster.submit(4)() == 16  # nothing lost
    message = str(raised.value)
    assert message.startswith(
        f"job argument 1 cannot be sent to a node: cannot pickle object of type "
        f"'{kind}'"
    ), message
    assert message.endswith(
        "send what it is made from instead (a file's path, not the open file; a "
        "list, not a generator) and make it in the job"
    ), message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    frames = [frame.name for frame in traceback.extract_tb(raised.tb)]
    assert "prepare" not in frames, frames


def test_jobcluster_submit_unpicklable_argument_is_caught_as_pickle_errors_are(local):
    """Code written for dispy or pickle catches TypeError / pickle.PicklingError
    around a submit that pickles its arguments: dispynb's error is both (and still
    a DispynbError)."""
    with JobCluster(jobs.square, nodes=local) as cluster:
        for caught in (TypeError, pickle.PicklingError, pickle.PickleError):
            with pytest.raises(caught) as raised:
                cluster.submit(threading.Lock())
            assert isinstance(raised.value, SerializationError)
        assert cluster.submit(4)() == 16


def test_jobcluster_submit_unpicklable_argument_raises_and_sends_nothing(local, capsys):
    with JobCluster(jobs.square, nodes=local) as cluster:
        assert cluster.submit(3)() == 9
        assert cluster.wait(timeout=WAIT)  # no longer pending (after its waiters)
        cluster.print_status()  # refreshes the nodes' traffic counters
        sent = cluster.status().nodes[0].tx
        with pytest.raises(SerializationError, match="lock"):
            cluster.submit(threading.Lock())
        cluster.print_status()
        assert cluster.status().nodes[0].tx == sent
        assert cluster.status().jobs_pending == 0
        assert cluster.submit(4)() == 16
        assert cluster.status().nodes[0].jobs_done == 2


_LOCK = threading.Lock()


def guarded(x: int) -> int:
    with _LOCK:  # a global that cannot travel: the job would need its own
        return x


def test_jobcluster_computation_using_an_unpicklable_global_names_it(local):
    with pytest.raises(SerializationError) as raised:
        JobCluster(guarded, nodes=local)
    message = str(raised.value)
    assert message.startswith("computation guarded cannot be sent to the nodes: ")
    assert "it uses _LOCK (global, a _thread.lock)" in message, message
    assert "'dict'" not in message  # not the internal bundle
    # The message says it all: the traceback ends at JobCluster(), without the
    # frames of the backend that pickled the computation.
    frames = [frame.name for frame in traceback.extract_tb(raised.tb)]
    assert "check_shippable" not in frames and "open" not in frames, frames


# --- cancel -------------------------------------------------------------------


def test_cancel_job_queued_on_node_ends_cancelled(local1, tmp_path):
    long_marker, queued_marker = tmp_path / "long", tmp_path / "queued"
    with JobCluster(jobs.mark_and_sleep, nodes=local1) as cluster:
        try:
            long = cluster.submit(str(long_marker), 60)
            wait_for_path(long_marker)
            queued = cluster.submit(str(queued_marker), 0)  # within the node's window
            assert cluster.cancel(queued) == 0
            assert queued.wait(timeout=PROMPT)
            assert not queued_marker.exists()
            assert not long.done()
            assert queued.status == DispyJob.Cancelled
        finally:
            cluster.close(terminate=True)


def test_cancel_job_sent_ahead_to_busy_worker_settles_promptly(local1, tmp_path):
    long_marker, ahead_marker = tmp_path / "long", tmp_path / "ahead"
    with JobCluster(jobs.mark_and_sleep, nodes=local1) as cluster:
        try:
            # Quick jobs first: the node then sends jobs ahead to busy workers.
            warmup = [cluster.submit(None, 0) for _ in range(5)]
            assert cluster.wait(timeout=WAIT)
            assert {job.status for job in warmup} == {DispyJob.Finished}
            long = cluster.submit(str(long_marker), 60)
            wait_for_path(long_marker)
            ahead = cluster.submit(str(ahead_marker), 0)
            assert cluster.cancel(ahead) == 0
            assert ahead.wait(timeout=PROMPT), "cancel not settled promptly"
            assert ahead.status == DispyJob.Cancelled
            assert not ahead_marker.exists()
            assert not long.done()
        finally:
            cluster.close(terminate=True)


#: Rounds of the tests of a job sent ahead to a worker whose running job is
#: cancelled: before the fix, that worker started the job as the other ended, or
#: was killed first (the node replaces it), a race: each test runs it again.
AHEAD_ROUNDS = 3


def _long_job_and_one_sent_ahead(
    cluster: JobCluster, path: Path, ahead_seconds: float
) -> tuple[DispyJob, DispyJob, int]:
    """On a 1-CPU node: a running 60 s job, and a job sent ahead to its worker
    (the node sends jobs ahead once its jobs are seen to be short), logging to
    ``path``/long and ``path``/ahead. Returns both and the running job's worker."""
    path.mkdir()
    warmup = [cluster.submit(os.devnull, 0) for _ in range(5)]
    assert cluster.wait(timeout=WAIT)
    assert {job.status for job in warmup} == {DispyJob.Finished}
    long = cluster.submit(str(path / "long"), 60)
    wait_until(lambda: len(logged_pids(path / "long")) == 1)
    # Within the node's window: it reaches the node before any cancel that follows.
    ahead = cluster.submit(str(path / "ahead"), ahead_seconds)
    return long, ahead, logged_pids(path / "long")[0]


def test_cancel_running_job_runs_the_job_sent_ahead_to_its_worker_once_elsewhere(
    local1, tmp_path
):
    """The job sent ahead to a worker whose running job is cancelled is not
    started by that worker as the interrupted job ends (the worker is replaced:
    it was killed with it and run again), but once, on the next worker."""
    for round_ in range(AHEAD_ROUNDS):
        path = tmp_path / str(round_)
        with JobCluster(jobs.log_and_sleep, nodes=local1) as cluster:
            try:
                long, ahead, interrupted = _long_job_and_one_sent_ahead(
                    cluster, path, 0.5
                )
                assert cluster.cancel(long) == 0
                assert long.wait(timeout=PROMPT)
                assert long.status == DispyJob.Terminated
                assert ahead.wait(timeout=WAIT)
                assert ahead.status == DispyJob.Finished, ahead.exception
                assert logged_pids(path / "ahead") == [ahead.result], "its runs"
                assert ahead.result != interrupted
            finally:
                cluster.close(terminate=True)


@pytest.mark.parametrize(
    "order", ["ahead first", "unstarted first", "running first", "after"]
)
def test_cancel_running_job_and_the_job_sent_ahead_behind_it(local1, tmp_path, order):
    """Both cancelled, the one sent ahead first, or just after the running one, or
    once that one is reported terminated: the running job ends Terminated; the
    one sent ahead never starts on the interrupted worker (as the interrupted job
    ends, before its own cancel is read), nor after its cancel.

    Cancelled first, it ends Cancelled; so it does if it was first cancelled
    unless started (its future's cancel), then the running one, then it (an
    Executor's interrupt whose cancels went in the order of submission: it ended
    Terminated without running, the flake of test_executor_shutdown.py's
    test_an_interrupt_in_the_with_block_terminates_the_running_calls).

    Cancelled after, it may have moved to the replacement worker meanwhile: then
    it ends Cancelled if it had not started there, Terminated if it had, or
    Finished if it was done (two cancels are two requests: under load the second
    may come late)."""
    for round_ in range(AHEAD_ROUNDS):
        path = tmp_path / str(round_)
        with JobCluster(jobs.log_and_sleep, nodes=local1) as cluster:
            try:
                long, ahead, interrupted = _long_job_and_one_sent_ahead(
                    cluster, path, 60
                )
                if order == "ahead first":
                    assert cluster.cancel(ahead) == 0
                elif order == "unstarted first":
                    cancel_futures([ahead.future], wait=False)  # not waiting
                assert cluster.cancel(long) == 0
                if order == "after":
                    assert long.wait(timeout=PROMPT)
                if order != "ahead first":
                    cluster.cancel(ahead)
                assert long.wait(timeout=PROMPT) and ahead.wait(timeout=PROMPT)
                assert long.status == DispyJob.Terminated, long.exception
                # The replacement worker runs the next job, and nothing before it.
                assert cluster.submit(os.devnull, 0).wait(timeout=WAIT)
                runs = logged_pids(path / "ahead")
                assert interrupted not in runs
                strict = order in ("ahead first", "unstarted first")
                if strict or ahead.status == DispyJob.Cancelled:
                    assert ahead.status == DispyJob.Cancelled, ahead.exception
                    assert runs == []
                elif ahead.status == DispyJob.Finished:
                    assert runs == [ahead.result]
                else:  # interrupted on the next worker, maybe before it began
                    assert ahead.status == DispyJob.Terminated, ahead.exception
                    assert len(runs) <= 1
            finally:
                cluster.close(terminate=True)


def test_cancel_job_queued_on_client_ends_cancelled_and_never_runs(local1, tmp_path):
    long_marker = tmp_path / "long"
    with JobCluster(jobs.mark_and_sleep, nodes=local1) as cluster:
        long = cluster.submit(str(long_marker), 60)
        wait_for_path(long_marker)
        # More than the node's pipeline holds for 1 CPU: the last stays on the client.
        behind = [cluster.submit(str(tmp_path / f"behind-{i}"), 0) for i in range(6)]
        last = behind[-1]
        assert cluster.cancel(last) == 0
        assert last.wait(timeout=PROMPT)
        assert last.status == DispyJob.Cancelled == 8
        assert "cancel" in last.exception
        assert not long.done()
        # Let the others run: cancel the long job.
        assert cluster.cancel(long) == 0
        assert cluster.wait(timeout=WAIT)
    assert long.status == DispyJob.Terminated
    assert [job.status for job in behind[:-1]] == [DispyJob.Finished] * 5
    assert all((tmp_path / f"behind-{i}").exists() for i in range(5))
    assert not (tmp_path / "behind-5").exists()


def test_cancel_running_job_terminated_promptly_and_worker_replaced(local1, tmp_path):
    marker = tmp_path / "running"
    with JobCluster(jobs.mark_and_sleep, nodes=local1) as cluster:
        job = cluster.submit(str(marker), 60)
        wait_for_path(marker)
        killed = read_pid(marker)
        started = time.monotonic()
        assert cluster.cancel(job) == 0
        assert job.wait(timeout=PROMPT)
        assert time.monotonic() - started < PROMPT
        assert job.status == DispyJob.Terminated == 9
        assert "terminated" in job.exception
        # An interrupted worker is replaced (it may hold broken state).
        wait_until(lambda: not psutil.pid_exists(killed))
        nxt = cluster.submit(str(tmp_path / "next"), 0)
        assert nxt.wait(timeout=WAIT)
        assert nxt.status == DispyJob.Finished
        assert nxt.result != killed


def test_cancel_running_job_that_catches_interrupt_ends_finished(local1, tmp_path):
    """dispy's cancel: the job gets KeyboardInterrupt and may return a value."""
    marker = tmp_path / "running"
    with JobCluster(jobs.sleep_unless_interrupted, nodes=local1) as cluster:
        job = cluster.submit(str(marker), 60)
        wait_for_path(marker)
        assert cluster.cancel(job) == 0
        assert job.wait(timeout=PROMPT)
        assert job.status == DispyJob.Finished
        assert job.result == "interrupted"


def test_cancel_finished_job_returns_minus_one(local):
    with JobCluster(jobs.square, nodes=local) as cluster:
        job = cluster.submit(5)
        assert job() == 25
        assert cluster.cancel(job) == -1
        assert job.status == DispyJob.Finished
        assert job.result == 25


def test_close_terminate_with_long_jobs_running_returns_quickly(local, tmp_path):
    cluster = JobCluster(jobs.mark_and_sleep, nodes=local)
    markers = [tmp_path / f"m{i}" for i in range(4)]
    submitted = [cluster.submit(str(marker), 60) for marker in markers]
    # 2 CPUs; generous waits: other tests' computations may still be winding down.
    wait_until(lambda: sum(marker.exists() for marker in markers) == 2, timeout=30)
    cluster.close(terminate=True)
    assert all(job.done() for job in submitted)
    # Ended by the close, not waited for (each would have run its 60 s).
    assert not [job for job in submitted if job.status == DispyJob.Finished]
    assert {job.status for job in submitted} <= {
        DispyJob.Terminated,
        DispyJob.Cancelled,
    }
    ran = [
        job for job, marker in zip(submitted, markers, strict=True) if marker.exists()
    ]
    assert [job.status for job in ran] == [DispyJob.Terminated] * 2
    with pytest.raises(ClusterError, match="closed"):
        cluster.submit(str(tmp_path / "late"), 0)


# --- callbacks ----------------------------------------------------------------


def test_job_status_callback_once_per_job_on_one_other_thread_in_completion_order(
    local1,
):
    calls: list[tuple[object, int, int]] = []

    def job_status(job: DispyJob) -> None:
        calls.append((job.id, job.status, threading.get_ident()))

    with JobCluster(jobs.square, nodes=local1, job_status=job_status) as cluster:
        # One CPU: the jobs complete in the order they were submitted.
        submitted = [cluster.submit(i) for i in range(30)]
        assert cluster.wait(timeout=WAIT)
        assert len(calls) == 30  # wait() returns after the callbacks ran
    assert [job_id for job_id, _, _ in calls] == [job.id for job in submitted]
    assert {status for _, status, _ in calls} == {DispyJob.Finished}
    threads = {ident for _, _, ident in calls}
    assert len(threads) == 1
    assert threads != {threading.main_thread().ident}
    ends = [job.end_time for job in submitted]
    assert ends == sorted(ends)


def test_job_status_callback_raising_is_logged_and_later_callbacks_run(
    local1, allow_error_logs
):
    seen: list[int] = []

    def job_status(job: DispyJob) -> None:
        seen.append(job.result)
        if job.result == 9:
            raise RuntimeError("callback failed on purpose")

    with JobCluster(jobs.square, nodes=local1, job_status=job_status) as cluster:
        submitted = [cluster.submit(i) for i in range(6)]
        assert cluster.wait(timeout=WAIT)
    assert seen == [i * i for i in range(6)]
    assert all(job.status == DispyJob.Finished for job in submitted)
    messages = [
        (record.getMessage(), record.exc_info)
        for record in allow_error_logs
        if record.exc_info and "on purpose" in str(record.exc_info[1])
    ]
    assert len(messages) == 1
    assert "job_status" in messages[0][0]


def test_cluster_status_callback_sees_node_and_job_lifecycle_then_closed(local):
    events: list[tuple[int, str | None, object]] = []

    def cluster_status(status: int, node: DispyNode | None, job: DispyJob | None):
        events.append(
            (
                int(status),
                node.ip_addr if node is not None else None,
                job.id if job is not None else None,
            )
        )

    cluster = JobCluster(jobs.square, nodes=local, cluster_status=cluster_status)
    job = cluster.submit_job_id("the-job", 6)
    assert job() == 36
    cluster.close()

    assert (
        events[0] == (DispyNode.Initialized, "127.0.0.1", None) == (4, *events[0][1:])
    )
    job_events = [status for status, _, job_id in events if job_id == "the-job"]
    assert (
        job_events
        == [
            DispyJob.Created,
            DispyJob.Running,
            DispyJob.Finished,
        ]
        == [5, 6, 11]
    )
    assert events[-1] == (DispyNode.Closed, "127.0.0.1", None)
    assert DispyNode.Closed == 16
    assert len(events) == 5


# --- context manager, isolation, large data -----------------------------------


def test_jobcluster_context_manager_propagates_exception_and_closes(local, tmp_path):
    marker = tmp_path / "long"
    with (
        pytest.raises(KeyError, match="from the with block"),
        JobCluster(jobs.mark_and_sleep, nodes=local) as cluster,
    ):
        long = cluster.submit(str(marker), 60)
        wait_for_path(marker)
        raise KeyError("from the with block")
    assert long.status == DispyJob.Terminated  # not waited for: its 60 s
    with pytest.raises(ClusterError, match="closed"):
        cluster.submit(str(tmp_path / "late"), 0)


def _adder(n: int):
    def compute(x: int) -> int:
        return x + n

    return compute


def _multiplier(n: int):
    def compute(x: int) -> int:
        return x * n

    return compute


def test_jobcluster_two_clusters_on_same_node_are_isolated(local):
    add, mul = _adder(1000), _multiplier(10)
    assert add.__name__ == mul.__name__ == "compute"
    with (
        JobCluster(add, nodes=local) as adding,
        JobCluster(mul, nodes=local) as multiplying,
    ):
        pairs = [(adding.submit(i), multiplying.submit(i)) for i in range(50)]
        assert adding.wait(timeout=WAIT) and multiplying.wait(timeout=WAIT)
        assert adding.status().nodes[0].jobs_done == 50
        assert multiplying.status().nodes[0].jobs_done == 50
    assert [(a.result, m.result) for a, m in pairs] == [
        (i + 1000, i * 10) for i in range(50)
    ]


def test_jobcluster_ten_megabyte_argument_and_result_round_trip(local):
    data = os.urandom(10 * 1024 * 1024)
    with JobCluster(jobs.echo_bytes, nodes=local) as cluster:
        job = cluster.submit(data)
        assert job.wait(timeout=WAIT)
    assert job.status == DispyJob.Finished, job.exception
    length, digest, echoed = job.result
    assert length == len(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert echoed == data


def test_jobcluster_await_job_from_asyncio_returns_result(local):
    async def gather_results(cluster: JobCluster) -> list[int]:
        jobs_ = [cluster.submit(i) for i in range(5)]
        return list(await asyncio.wait_for(asyncio.gather(*jobs_), timeout=WAIT))

    with JobCluster(jobs.square, nodes=local) as cluster:
        assert asyncio.run(gather_results(cluster)) == [0, 1, 4, 9, 16]
