"""Tests of `dispynb.job`: status numbers, blocking, awaiting and exactly-once."""

from __future__ import annotations

import asyncio
import copy
import threading
import time

import pytest

from dispynb.job import FINAL_STATUSES, DispyJob, JobStatus

TIMEOUT = 5.0


def make_job(job_id: object = None) -> DispyJob:
    return DispyJob(job_id, (1, 2), {"k": 3})


def run_in_thread(target, *args, **kwargs) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


# -- status numbers --------------------------------------------------------------------


def test_job_status_values_match_dispy():
    assert {s.name: int(s) for s in JobStatus} == {
        "Created": 5,
        "Running": 6,
        "ProvisionalResult": 7,
        "Cancelled": 8,
        "Terminated": 9,
        "Abandoned": 10,
        "Finished": 11,
    }


def test_job_class_constants_equal_status_members_and_ints():
    for status in JobStatus:
        assert getattr(DispyJob, status.name) is status
    job = make_job()
    job._complete(JobStatus.Finished, result=1)
    assert job.status == DispyJob.Finished
    assert job.status == 11


def test_job_status_is_final_only_for_final_statuses():
    final = {s for s in JobStatus if s.is_final}
    assert final == set(FINAL_STATUSES)
    assert final == {
        JobStatus.Cancelled,
        JobStatus.Terminated,
        JobStatus.Abandoned,
        JobStatus.Finished,
    }


# -- construction ----------------------------------------------------------------------


def test_job_id_none_takes_increasing_counter():
    first, second = make_job(), make_job()
    assert isinstance(first.id, int)
    assert first.id >= 1
    assert second.id == first.id + 1


def test_job_id_given_is_kept_without_consuming_counter():
    before = make_job()
    named = make_job("alpha")
    after = make_job()
    assert named.id == "alpha"
    assert after.id == before.id + 1


def test_job_id_zero_and_other_false_ids_are_kept():
    """dispy replaced a false id with the next number (``submit_job_id(0, ...)``
    in a ``range`` loop gave job 0 the id of another job); dispynb keeps it."""
    assert [make_job(job_id).id for job_id in (0, "", False)] == [0, "", False]


def test_job_new_is_created_with_fields_like_dispy():
    start = time.time()
    job = make_job()
    assert job.status is JobStatus.Created
    assert start <= job.submit_time <= time.time()
    assert job.result is None
    assert job.exception is None
    assert job.start_time is None
    assert job.end_time is None
    assert job.ip_addr is None
    assert not job.finish.is_set()
    assert not job.done()
    assert job._args == (1, 2)
    assert job._kwargs == {"k": 3}
    assert job._key is None


def test_job_slots_reject_unknown_attributes():
    job = make_job()
    with pytest.raises(AttributeError):
        job.not_an_attribute = 1  # type: ignore[attr-defined]


def test_job_id_is_assignable_by_user():
    job = make_job()
    job.id = ("batch", 3)
    assert job.id == ("batch", 3)


def test_job_repr_shows_id_and_status_name():
    job = make_job("j1")
    assert repr(job) == "<DispyJob id='j1' status=Created>"
    job._complete(JobStatus.Terminated, exception="Traceback ...")
    assert repr(job) == "<DispyJob id='j1' status=Terminated>"


def test_job_lt_orders_by_submit_order_not_id():
    jobs = [make_job("c"), make_job("a"), make_job("b")]
    assert sorted(reversed(jobs)) == jobs
    assert jobs[0] < jobs[1]
    assert not jobs[1] < jobs[0]


def test_job_lt_with_non_job_raises_type_error():
    with pytest.raises(TypeError):
        _ = make_job() < 3


def test_job_shallow_copy_keeps_fields():
    job = make_job("x")
    job._set_running("10.0.0.1")
    clone = copy.copy(job)
    clone.id = "y"
    assert job.id == "x"
    assert clone.status is JobStatus.Running
    assert clone.ip_addr == "10.0.0.1"
    assert clone.finish is job.finish


def test_a_snapshot_waits_for_its_job_however_it_is_waited_for():
    """Callbacks get snapshots (copies) of a job: ``snapshot()``, ``wait()``,
    ``await snapshot`` and ``finish`` end when the job ends. ``await`` on a
    snapshot never ended before: it waited on a list of its own that nothing woke."""
    job = make_job()
    snapshot = copy.copy(job)
    later = copy.copy(snapshot)  # a snapshot's snapshot: still the job's

    async def snapshot_awaited() -> object:
        return await later

    async def awaited() -> None:
        ender = threading.Timer(0.05, job._complete, (JobStatus.Finished, 7))
        ender.start()
        try:
            await asyncio.wait_for(snapshot_awaited(), 10)
        finally:
            ender.join()

    asyncio.run(awaited())
    assert snapshot.wait(0) and later.wait(0) and snapshot.finish.is_set()
    assert snapshot.finish is job.finish
    assert job() == 7


# -- state changes ---------------------------------------------------------------------


def test_job_set_running_sets_status_node_and_start_time():
    job = make_job()
    assert job._set_running("10.0.0.1")
    assert job.status is JobStatus.Running
    assert job.ip_addr == "10.0.0.1"
    assert job.start_time is not None
    assert not job.finish.is_set()


def test_job_complete_sets_every_field_then_finish():
    job = make_job()
    job._set_running("10.0.0.1")
    applied = job._complete(
        JobStatus.Finished,
        result=42,
        stdout="out",
        stderr="err",
        exception=None,
        start_time=100.0,
        end_time=101.5,
        ip_addr="10.0.0.2",
    )
    assert applied
    assert (job.result, job.stdout, job.stderr) == (42, "out", "err")
    assert (job.start_time, job.end_time) == (100.0, 101.5)
    assert job.ip_addr == "10.0.0.2"
    assert job.status is JobStatus.Finished
    assert job.finish.is_set()
    assert job.done()


def test_job_complete_without_times_keeps_start_and_sets_end_now():
    job = make_job()
    job._set_running("10.0.0.1")
    started = job.start_time
    job._complete(JobStatus.Finished, result=1)
    assert job.start_time == started
    assert job.ip_addr == "10.0.0.1"
    assert job.end_time is not None
    assert job.end_time >= started


def test_job_complete_program_output_keeps_bytes():
    job = make_job()
    job._complete(JobStatus.Finished, result=3, stdout=b"o", stderr=b"e")
    assert (job.result, job.stdout, job.stderr) == (3, b"o", b"e")


def test_job_complete_with_int_status_stores_enum_member():
    job = make_job()
    job._complete(11)  # type: ignore[arg-type]
    assert job.status is JobStatus.Finished


def test_job_complete_non_final_status_raises_value_error():
    job = make_job()
    with pytest.raises(ValueError, match="not a final"):
        job._complete(JobStatus.Running)
    assert not job.done()


def test_job_complete_twice_second_is_ignored_and_returns_false():
    job = make_job()
    assert job._complete(JobStatus.Cancelled)
    assert not job._complete(JobStatus.Finished, result="late", ip_addr="10.0.0.9")
    assert job.status is JobStatus.Cancelled
    assert job.result is None
    assert job.ip_addr is None


def test_job_complete_concurrent_from_many_threads_applies_once():
    job = make_job()
    barrier = threading.Barrier(8)
    outcomes: list[bool] = []

    def complete(n: int) -> None:
        barrier.wait(TIMEOUT)
        outcomes.append(job._complete(JobStatus.Finished, result=n))

    threads = [run_in_thread(complete, n) for n in range(8)]
    for thread in threads:
        thread.join(TIMEOUT)
    assert sorted(outcomes) == [False] * 7 + [True]
    assert job.result in range(8)


def test_job_updates_after_completion_are_ignored():
    job = make_job()
    job._complete(JobStatus.Finished, result="final", ip_addr="10.0.0.1")
    assert not job._set_running("10.0.0.2")
    assert not job._set_provisional("late")
    assert not job._requeue()
    assert job.status is JobStatus.Finished
    assert job.result == "final"
    assert job.ip_addr == "10.0.0.1"


def test_job_cancelled_while_running_ignores_later_starts_not_provisionals():
    job = make_job()
    job._set_running("10.0.0.1")
    assert job._mark_cancelled()
    assert not job._mark_cancelled()  # dispy: a second cancel is refused
    assert not job._set_running("10.0.0.2")
    assert job.status is JobStatus.Cancelled and not job.done()
    # Sent from its KeyboardInterrupt handler: dispy shows it, as this does.
    assert job._set_provisional("best so far")
    assert job.status is JobStatus.ProvisionalResult
    assert job._complete(JobStatus.Terminated)  # as its node reports
    assert job.status is JobStatus.Terminated
    assert not job._mark_cancelled()


def test_job_requeue_returns_running_job_to_created():
    job = make_job()
    job._set_running("10.0.0.1")
    assert job._requeue()
    assert job.status is JobStatus.Created
    assert job.ip_addr is None
    assert job.start_time is None


# -- blocking --------------------------------------------------------------------------


def test_job_call_blocks_until_completed_from_other_thread():
    job = make_job()
    results: list[object] = []
    waiter = run_in_thread(lambda: results.append(job()))
    waiter.join(0.05)
    assert waiter.is_alive()
    assert results == []
    run_in_thread(job._complete, JobStatus.Finished, result="done")
    waiter.join(TIMEOUT)
    assert not waiter.is_alive()
    assert results == ["done"]


def test_job_call_after_completion_returns_result_repeatedly():
    job = make_job()
    job._complete(JobStatus.Terminated, result=None, exception="Traceback: boom")
    assert job() is None
    assert job() is None
    assert job.exception == "Traceback: boom"


def test_job_call_waits_through_provisional_results_for_the_final_one():
    job = make_job()
    results: list[object] = []
    waiter = run_in_thread(lambda: results.append(job()))
    for n in range(3):
        job._set_provisional(n)
        assert job.result == n
        assert job.status is JobStatus.ProvisionalResult
        assert not job.finish.is_set()
    waiter.join(0.05)
    assert waiter.is_alive()  # provisional results do not wake job()
    job._complete(JobStatus.Finished, result="final")
    waiter.join(TIMEOUT)
    assert results == ["final"]


def test_job_call_clear_waits_for_the_final_result_too():
    job = make_job()
    job._set_provisional("p")
    assert not job.finish.is_set()
    run_in_thread(job._complete, JobStatus.Finished, result="final")
    assert job(clear=True) == "final"


def test_job_call_clear_after_final_result_keeps_finish_set():
    job = make_job()
    job._complete(JobStatus.Finished, result=7)
    assert job(clear=True) == 7
    assert job.finish.is_set()
    assert job(clear=True) == 7


def test_job_provisional_result_leaves_finish_unset():
    job = make_job()
    job._set_provisional("p")
    assert job.result == "p"
    assert not job.finish.is_set()
    assert not job.done()


def test_job_wait_ignores_provisional_and_returns_true_when_done():
    job = make_job()
    job._set_provisional("p")
    assert job.wait(timeout=0.01) is False
    waited: list[bool] = []
    waiter = run_in_thread(lambda: waited.append(job.wait(TIMEOUT)))
    job._complete(JobStatus.Abandoned)
    waiter.join(TIMEOUT)
    assert waited == [True]
    assert job.wait(0) is True
    assert job.done()


def test_job_wait_timeout_on_pending_job_returns_false():
    assert make_job().wait(timeout=0.01) is False


# -- awaiting --------------------------------------------------------------------------


def test_job_await_from_fresh_loop_completed_by_other_thread_returns_result():
    job = make_job()

    async def main() -> object:
        task = asyncio.ensure_future(asyncio.wait_for(job, TIMEOUT))
        while not job._waiters:  # let the task register its waiter
            await asyncio.sleep(0)
        run_in_thread(job._complete, JobStatus.Finished, result="async")
        return await task

    assert asyncio.run(main()) == "async"
    assert job._waiters is None


def test_job_await_after_completion_returns_without_waiting():
    job = make_job()
    job._complete(JobStatus.Cancelled, result="c")

    async def main() -> object:
        return await asyncio.wait_for(job, TIMEOUT)

    assert asyncio.run(main()) == "c"


def test_job_await_provisional_result_does_not_wake_waiter():
    job = make_job()

    async def main() -> object:
        task = asyncio.ensure_future(asyncio.wait_for(job, TIMEOUT))
        while not job._waiters:
            await asyncio.sleep(0)
        done = threading.Event()

        def node() -> None:
            job._set_provisional("p")
            done.set()

        run_in_thread(node)
        await asyncio.get_running_loop().run_in_executor(None, done.wait, TIMEOUT)
        assert not task.done()
        job._complete(JobStatus.Finished, result="final")
        return await task

    assert asyncio.run(main()) == "final"


def test_job_await_from_loops_in_two_threads_wakes_both():
    job = make_job()
    registered = threading.Barrier(3)
    results: list[object] = []

    def loop_thread() -> None:
        async def main() -> object:
            loop = asyncio.get_running_loop()
            task = asyncio.ensure_future(asyncio.wait_for(job, TIMEOUT))
            while not any(w[0] is loop for w in job._waiters or ()):
                await asyncio.sleep(0)
            await loop.run_in_executor(None, registered.wait, TIMEOUT)
            return await task

        results.append(asyncio.run(main()))

    threads = [run_in_thread(loop_thread) for _ in range(2)]
    registered.wait(TIMEOUT)
    assert job._waiters is not None
    assert len(job._waiters) == 2
    job._complete(JobStatus.Finished, result="both")
    for thread in threads:
        thread.join(TIMEOUT)
    assert results == ["both", "both"]


def test_job_await_timeout_removes_waiter():
    job = make_job()

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(job, 0.01)

    asyncio.run(main())
    assert not job._waiters
    assert job._complete(JobStatus.Finished, result=1)
