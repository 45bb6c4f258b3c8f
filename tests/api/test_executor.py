"""Tests of `dispynb.executor`: the behaviours CPython's own ProcessPoolExecutor tests
check (Lib/test/test_concurrent_futures), on a real local node.

Functions here are module-level (shipped by value) or closures and lambdas; a job
that must be seen running holds until the test creates a release file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import itertools
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

import dispynb
from dispynb import LocalCluster
from dispynb.errors import RemoteError, SerializationError, SetupError
from dispynb.executor import Executor
from tests.jobs import WAIT, wait_for_path, wait_until
from tests.sigint import (
    SigintAtCReturn,
    main_waits_in_function,
    python_handles_sigint,
    sigint_when,
)

pytestmark = pytest.mark.slow


def mul(x: int, y: int) -> int:
    return x * y


def hold(marker: str, release: str, value: object = None) -> object:
    """Write ``marker``, then wait (at most WAIT s) until ``release`` exists; then
    write ``marker.ended`` (a terminated call never writes it)."""
    Path(marker).touch()
    deadline = time.monotonic() + WAIT
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.005)
    Path(f"{marker}.ended").touch()
    return value


def send_ahead(executor: Executor) -> None:
    """Run quick calls first: a node then sends the next jobs ahead to its busy
    workers (it does so only for short jobs), where they wait behind the running
    ones, and only the worker can tell whether one started."""
    assert list(executor.map(mul, range(20), range(20))) == [i * i for i in range(20)]


def ended(path: Path) -> list[Path]:
    """The calls of `hold` under ``path`` that returned."""
    return sorted(path.glob("*.ended"))


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("no pickling")


def raise_unpicklable() -> None:
    raise Unpicklable("stays on the node")


class NeedsTwo(Exception):
    """Pickles, but unpickling calls ``NeedsTwo(*args)``: one argument short."""

    def __init__(self, first: object, second: object) -> None:
        super().__init__(f"{first} and {second}")


def raise_needs_two_on_2(x: int) -> int:
    if x == 2:
        raise NeedsTwo(x, "b")
    return x


@pytest.fixture
def executor(local: LocalCluster):
    """An executor on the module's 2-CPU node (its computation closes per test)."""
    with Executor(nodes=local) as executor:
        yield executor


class Gate:
    """Jobs that start (a marker each) and hold until `open`."""

    def __init__(self, path: Path) -> None:
        self.dir = path
        self.release = str(path / "release")
        self.count = itertools.count()

    def submit(self, executor: Executor, value: object = None) -> cf.Future:
        marker = str(self.dir / f"started-{next(self.count)}")
        future = executor.submit(hold, marker, self.release, value)
        future.marker = marker  # type: ignore[attr-defined]
        return future

    def started(self, future: cf.Future) -> None:
        wait_for_path(future.marker)  # type: ignore[attr-defined]
        wait_until(future.running)  # the node reported the start

    def open(self) -> None:
        Path(self.release).touch()


# -- submit and results ------------------------------------------------------------


def test_submit_positional_keyword_closure_and_lambda(executor):
    base = 10

    def add_base(x: int) -> int:  # a closure: travels by value
        return x + base

    assert executor.submit(mul, 2, 8).result(WAIT) == 16
    assert executor.submit(mul, x=2, y=3).result(WAIT) == 6
    assert executor.submit(add_base, 5).result(WAIT) == 15
    assert executor.submit(lambda: "λ").result(WAIT) == "λ"
    assert executor.submit(divmod, 7, 2).result(WAIT) == (3, 1)  # a builtin
    with pytest.raises(TypeError):
        executor.submit(42)


def test_a_global_read_at_submit_time(executor):
    """Each submit pickles the function anew: it sees the values of that time."""
    scale = [2]

    def scaled(x: int) -> int:
        return x * scale[0]

    first = executor.submit(scaled, 5).result(WAIT)
    scale[0] = 3
    assert (first, executor.submit(scaled, 5).result(WAIT)) == (10, 15)


def test_exception_is_the_remote_one_with_the_remote_traceback(executor):
    future = executor.submit(divmod, 1, 0)
    with pytest.raises(ZeroDivisionError) as info:
        future.result(WAIT)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteError) and cause.ename == "ZeroDivisionError"
    assert "Traceback" in cause.traceback
    assert isinstance(future.exception(WAIT), ZeroDivisionError)
    assert future.job.status == dispynb.DispyJob.Finished  # the call raised, not it


def fail_loudly(x: int) -> int:
    if x == 2:
        raise LookupError(f"no entry {x}")
    return x


def test_remote_tracebacks_show_the_file_and_source_lines(executor):
    """As ProcessPoolExecutor's and a local traceback: code sent by value reads
    ``File "<dynamic-code>"`` on the node, without its source line."""
    where = f'File "{__file__}", line '
    source = '    raise LookupError(f"no entry {x}")\n'
    with pytest.raises(LookupError) as info:
        executor.submit(fail_loudly, 2).result(WAIT)
    text = info.value.__cause__.traceback
    assert where in text and source in text and "<dynamic-code>" not in text, text
    results = executor.map(fail_loudly, range(4), chunksize=2)
    assert next(results) == 0 and next(results) == 1
    with pytest.raises(LookupError) as info:
        next(results)
    text = info.value.__cause__.traceback
    assert where in text and source in text and "<dynamic-code>" not in text, text


def make_generator() -> object:
    return (i for i in range(3))


def lock_on_2(x: int) -> object:
    return {"lock": threading.Lock()} if x == 2 else x


def test_a_value_that_cannot_be_sent_back_names_its_call(executor):
    """As ProcessPoolExecutor, a RemoteError from result(); its message names the
    call and the value, not their places in the executor's own outcomes (it
    said "result of type 'tuple' cannot be pickled; result[0][0] is a ...")."""
    with pytest.raises(RemoteError) as info:
        executor.submit(make_generator).result(WAIT)
    assert (
        "the value returned by the call is a 'generator' that cannot be pickled"
        in str(info.value)
    )
    assert "tuple" not in str(info.value)
    results = executor.map(lock_on_2, range(4), chunksize=4)  # the chunk fails
    with pytest.raises(RemoteError) as info:
        next(results)
    assert (
        "the value returned by call 3 of its chunk has ['lock'], a 'lock' that "
        "cannot be pickled"
    ) in str(info.value)
    assert executor.submit(lock_on_2, 1).result(WAIT) == 1  # the executor goes on


def interrupt(x: int) -> None:
    raise KeyboardInterrupt(f"stop {x}")


def test_a_call_that_ends_its_job_shows_its_source_lines_too(executor):
    """KeyboardInterrupt ends the call's job (RemoteError, documented): its
    traceback names this file and line too, for submit and map alike."""
    where = f'File "{__file__}", line '
    source = '    raise KeyboardInterrupt(f"stop {x}")\n'
    for call in (
        lambda: executor.submit(interrupt, 1).result(WAIT),
        lambda: next(executor.map(interrupt, [1])),
    ):
        with pytest.raises(RemoteError, match="KeyboardInterrupt: stop 1") as info:
            call()
        text = info.value.traceback
        assert where in text and source in text and "<dynamic-code>" not in text


def test_unpicklable_exception_becomes_remote_error(executor):
    future = executor.submit(raise_unpicklable)
    with pytest.raises(RemoteError) as info:
        future.result(WAIT)
    assert info.value.ename == "Unpicklable" and "stays on the node" in str(info.value)
    assert "raise_unpicklable" in info.value.traceback


def test_exception_that_does_not_unpickle_becomes_remote_error(executor):
    """A classic (ProcessPoolExecutor breaks its pool on it): the call's
    RemoteError names it, with its traceback; the other calls of its job
    (a map chunk) keep their values."""
    with pytest.raises(RemoteError, match="NeedsTwo: 2 and b") as failure:
        executor.submit(raise_needs_two_on_2, 2).result(WAIT)
    assert "raise_needs_two_on_2" in failure.value.traceback
    results = executor.map(raise_needs_two_on_2, range(4), chunksize=4)
    assert next(results) == 0 and next(results) == 1
    with pytest.raises(RemoteError, match="NeedsTwo"):
        next(results)


def test_an_argument_that_cannot_be_pickled_is_named_at_submit(executor, tmp_path):
    """Raised at once (ProcessPoolExecutor raises at ``result()``), naming the
    argument; a ``map`` that meets one leaves none of its calls running."""
    with pytest.raises(SerializationError, match=r"^argument 2 cannot be sent.*lock"):
        executor.submit(mul, 1, threading.Lock())
    with pytest.raises(SerializationError, match=r"^keyword argument 'y' cannot"):
        executor.submit(mul, 1, y=threading.Lock())
    gate = Gate(tmp_path)
    running = [gate.submit(executor, i) for i in range(2)]  # both CPUs busy
    for future in running:
        gate.started(future)
    touched = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(SerializationError, match=r"^argument 1 cannot be sent"):
        executor.map(Path.touch, [*touched, threading.Lock()])
    wait_until(lambda: executor.cluster.job_counts["Cancelled"] == 2)
    gate.open()
    assert [future.result(WAIT) for future in running] == [0, 1]
    assert not any(path.exists() for path in touched)


def test_a_function_that_cannot_be_pickled_names_what_it_captures(executor):
    """The bare pickle message named only a type ("cannot pickle '_thread.lock'
    object"); ProcessPoolExecutor's says no more, from result()."""
    lock = threading.Lock()
    message = (
        r"^function .*<lambda> cannot be sent to the nodes: it uses lock \(closure"
    )
    with pytest.raises(SerializationError, match=message):
        executor.submit(lambda: lock.locked())
    with pytest.raises(SerializationError, match=message):
        executor.map(lambda x: lock.locked(), [1])


def test_result_and_exception_time_out(executor, tmp_path):
    gate = Gate(tmp_path)
    future = gate.submit(executor, "late")
    with pytest.raises(TimeoutError):
        future.result(timeout=0.05)
    with pytest.raises(TimeoutError):
        future.exception(timeout=0.05)
    gate.open()
    assert future.result(WAIT) == "late"


def test_await_a_future_in_asyncio_code(executor):
    async def main() -> list[int]:
        return list(
            await asyncio.gather(executor.submit(mul, 3, 3), executor.submit(mul, 4, 4))
        )

    assert asyncio.run(main()) == [9, 16]


def test_cancelling_from_asyncio_does_not_stall_the_event_loop(executor, tmp_path):
    """``wait_for`` on ``run_in_executor`` times out and cancels the call from the
    loop's thread: that must not wait there for the node's answer (for a call sent
    ahead to a busy worker, only once the running call ends)."""
    send_ahead(executor)
    gate = Gate(tmp_path)
    running = [gate.submit(executor, i) for i in range(2)]
    queued = executor.submit(Path.touch, tmp_path / "queued")  # ahead, behind one

    async def give_up_waiting() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(queued), 0.05)

    for future in running:
        gate.started(future)
    asyncio.run(give_up_waiting())
    assert ended(tmp_path) == []  # it did not wait for the running calls
    gate.open()
    assert [future.result(WAIT) for future in running] == [0, 1]
    cf.wait([queued], WAIT)
    assert queued.cancelled() or queued.result(0) is None


def test_max_workers_must_be_positive():
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_workers"):
            Executor(max_workers=bad)


def set_env(name: str, value: str) -> None:
    os.environ[name] = value


def env(name: str) -> str | None:
    return os.environ.get(name)


def fail_setup() -> None:
    raise OSError("no such device")


def test_initializer_runs_on_each_node_before_the_calls(local):
    with Executor(nodes=local, initializer=set_env, initargs=("DISPYNB_T", "on")) as ex:
        assert list(ex.map(env, ["DISPYNB_T"] * 4)) == ["on"] * 4


def test_failing_initializer_is_a_setup_error_with_the_node_traceback(local):
    with pytest.raises(SetupError) as info:
        Executor(nodes=local, initializer=fail_setup)
    assert "no such device" in str(info.value) + info.value.remote_traceback


def test_max_tasks_per_child_one_is_a_fresh_process_per_call(local):
    with Executor(nodes=local, max_tasks_per_child=1) as ex:
        pids = [f.result(WAIT) for f in [ex.submit(os.getpid) for _ in range(4)]]
    assert len(set(pids)) == 4
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        Executor(nodes=local, max_tasks_per_child=5)


def test_job_timeout_stops_a_call_with_a_remote_error(local):
    """The node interrupts a call over job_timeout: the executor does not take the
    interrupt for the call's own exception."""
    with Executor(nodes=local, job_timeout=0.5) as ex:
        future = ex.submit(time.sleep, 30)
        with pytest.raises(RemoteError) as info:
            future.result(WAIT)
    assert future.job.status == dispynb.DispyJob.Terminated
    # How to allow more, for an executor (a call cannot pass dispy_job_timeout).
    assert "limit of 0.5 s (the executor's job_timeout)" in str(info.value)
    assert "Executor(..., job_timeout=1)" in str(info.value), info.value
    assert "dispy_job_timeout" not in str(info.value)


def _segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def test_mem_limit_says_to_give_the_executor_a_larger_limit(local):
    """A call whose worker died under mem_limit: the advice names the executor's
    option (a call cannot pass dispy_job_mem_limit)."""
    with Executor(nodes=local, mem_limit="256M") as ex:
        future = ex.submit(_segfault)
        with pytest.raises(RemoteError) as info:
            future.result(WAIT)
    limit = 256 << 20
    assert (
        f"probably exceeded mem_limit of {limit} bytes (the executor's mem_limit)"
        in (str(info.value))
    ), info.value
    assert f"Executor(..., mem_limit={2 * limit})" in str(info.value)
    assert "dispy_job_mem_limit" not in str(info.value)


def _allocate(size: int) -> int:
    return len(bytearray(size))


def test_a_memory_error_under_mem_limit_says_how_to_allow_more(local):
    """A call that raised MemoryError under the executor's mem_limit: the caller
    gets the MemoryError itself (as from a local pool) with a note naming the
    executor's option and a larger value, by submit and by map."""
    limit = 256 << 20
    with Executor(nodes=local, mem_limit="256M") as ex:
        future = ex.submit(_allocate, 1 << 30)
        with pytest.raises(MemoryError) as info:
            future.result(WAIT)
        with pytest.raises(MemoryError) as mapped:
            list(ex.map(_allocate, [10, 1 << 30], timeout=WAIT))
        assert ex.submit(_allocate, 10).result(WAIT) == 10  # the worker lives on
    for error in (info.value, mapped.value):
        notes = "\n".join(getattr(error, "__notes__", []))
        assert f"mem_limit of {limit} bytes" in notes, notes
        assert f"Executor(..., mem_limit={2 * limit})" in notes, notes
        assert isinstance(error.__cause__, RemoteError)
    with Executor(nodes=local) as ex:  # no limit: no advice about one
        future = ex.submit(_raise_memory_error)
        with pytest.raises(MemoryError) as plain:
            future.result(WAIT)
    assert not getattr(plain.value, "__notes__", None)


def _raise_memory_error() -> None:
    raise MemoryError("simulated")


# -- map -------------------------------------------------------------------------------


def test_map_keeps_input_order_with_any_chunksize(executor):
    expected = [x * y for x, y in zip(range(23), range(5, 28), strict=True)]
    for chunksize in (1, 4, 100):
        assert (
            list(executor.map(mul, range(23), range(5, 28), chunksize=chunksize))
            == expected
        )
    assert list(executor.map(mul, [], [])) == []
    assert list(executor.map(mul, range(10), [2, 3])) == [0, 3]  # the shortest


def test_map_chunksize_must_be_positive(executor):
    with pytest.raises(ValueError, match="chunksize"):
        executor.map(mul, [1], [2], chunksize=0)


def test_map_raises_at_the_failing_item(executor):
    results = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(results) == (0, 1)
    assert next(results) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_map_in_chunks_yields_the_values_before_a_failure(executor):
    results = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5], chunksize=4)
    assert next(results) == (0, 1) and next(results) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_map_timeout_counts_from_the_call(executor, tmp_path):
    release = str(tmp_path / "release")
    markers = [str(tmp_path / f"m{i}") for i in range(3)]
    quick = [str(tmp_path / "open")]
    Path(quick[0]).touch()
    results = executor.map(hold, markers, quick * 2 + [release], [1, 2, 3], timeout=1)
    assert next(results) == 1 and next(results) == 2
    with pytest.raises(TimeoutError):
        next(results)
    Path(release).touch()


def test_map_timeout_is_raised_on_time_while_calls_still_run(executor, tmp_path):
    """As ProcessPoolExecutor: TimeoutError when the time is up, not when the
    running calls end; the calls not started are cancelled (some wait on the node,
    sent ahead behind the running ones, whose cancel the node answers only then)."""
    send_ahead(executor)
    release = str(tmp_path / "release")
    markers = [str(tmp_path / f"m{i}") for i in range(6)]
    results = executor.map(hold, markers, [release] * 6, timeout=0.2)
    for marker in markers[:2]:
        wait_for_path(marker)  # both CPUs busy, the rest queued or sent ahead
    with pytest.raises(TimeoutError):
        next(results)
    assert ended(tmp_path) == []  # raised while the first calls hold
    Path(release).touch()
    # The rest cancelled; or, as ProcessPoolExecutor's calls already handed to a
    # process, run: the release came before its cancel reached the node.
    counts = executor.cluster.job_counts
    wait_until(lambda: counts["Cancelled"] + counts["Finished"] == 20 + 6)
    assert counts["Cancelled"] == sum(not os.path.exists(m) for m in markers)


def test_map_reads_endless_input_lazily_with_buffersize(executor):
    results = executor.map(mul, itertools.count(), itertools.repeat(2), buffersize=3)
    assert list(itertools.islice(results, 7)) == [0, 2, 4, 6, 8, 10, 12]
    results.close()


def test_closing_a_map_early_cancels_its_queued_jobs(executor, tmp_path):
    """Left after its first value: the calls not started are cancelled (as the
    standard library's map cancels the futures it did not reach)."""
    gate = Gate(tmp_path)
    blocker = gate.submit(executor)  # one CPU busy
    gate.started(blocker)
    markers = [str(tmp_path / f"m{i}") for i in range(8)]
    quick = str(tmp_path / "open")
    Path(quick).touch()
    # The first call returns, the second holds the other CPU, six are queued.
    results = executor.map(hold, markers, [quick] + [gate.release] * 7, range(8))
    assert next(results) == 0
    wait_for_path(markers[1])
    results.close()
    wait_until(lambda: executor.cluster.job_counts["Cancelled"] == 6)
    gate.open()
    assert blocker.result(WAIT) is None
    assert [os.path.exists(m) for m in markers] == [True] * 2 + [False] * 6


def test_a_map_never_iterated_runs_all_its_calls(local, tmp_path):
    """``executor.map(save, items)`` for the calls' effects, its iterator dropped
    or closed unread: as with ProcessPoolExecutor, every call runs (they were all
    cancelled, silently)."""
    with Executor(nodes=local) as executor:
        gate = Gate(tmp_path)
        blockers = [gate.submit(executor, i) for i in range(2)]  # both CPUs busy
        for future in blockers:
            gate.started(future)
        dropped = [tmp_path / f"dropped-{i}" for i in range(4)]
        closed = [tmp_path / f"closed-{i}" for i in range(4)]
        executor.map(Path.touch, dropped)  # queued behind the blockers
        executor.map(Path.touch, closed, chunksize=2).close()
        gate.open()
    assert [path.exists() for path in dropped + closed] == [True] * 8
    assert executor.cluster.job_counts["Cancelled"] == 0


# -- wait, as_completed, cancel, callbacks --------------------------------------------


def test_wait_first_completed_first_exception_and_all(executor, tmp_path):
    gate = Gate(tmp_path)
    slow = gate.submit(executor, "slow")
    gate.started(slow)
    quick = executor.submit(mul, 2, 2)
    done, not_done = cf.wait(
        [slow, quick], timeout=WAIT, return_when=cf.FIRST_COMPLETED
    )
    assert (done, not_done) == ({quick}, {slow})
    failing = executor.submit(divmod, 1, 0)
    done, not_done = cf.wait(
        [slow, failing], timeout=WAIT, return_when=cf.FIRST_EXCEPTION
    )
    assert (done, not_done) == ({failing}, {slow})
    done, not_done = cf.wait([slow], timeout=0.05)
    assert not done
    gate.open()
    done, not_done = cf.wait([slow, quick, failing], timeout=WAIT)
    assert not not_done


def test_as_completed_yields_in_completion_order_and_times_out(executor, tmp_path):
    gate = Gate(tmp_path)
    slow = gate.submit(executor, "slow")
    gate.started(slow)
    quick = executor.submit(mul, 1, 1)
    completed = cf.as_completed([slow, quick], timeout=WAIT)
    assert next(completed) is quick
    with pytest.raises(TimeoutError):
        list(cf.as_completed([slow], timeout=0.05))
    gate.open()
    assert next(completed) is slow


def test_cancel_a_queued_future_but_not_a_running_one(executor, tmp_path):
    gate = Gate(tmp_path)
    running = [gate.submit(executor, i) for i in range(2)]
    for future in running:
        gate.started(future)
    queued = executor.submit(mul, 3, 3)
    assert queued.cancel() and queued.cancelled() and queued.done()
    assert not running[0].cancel() and running[0].running()
    with pytest.raises(cf.CancelledError):
        queued.result(0)
    assert cf.wait([queued], timeout=0).done == {queued}
    gate.open()
    assert [future.result(WAIT) for future in running] == [0, 1]
    assert not running[0].cancel()  # done


def test_ctrl_c_anywhere_in_cancel_leaves_a_future_that_settles(local1):
    """A Ctrl-C after each C call ``cancel()`` makes in turn, on a call queued
    behind a running one: the future still ends (cancelled, or with its
    result). One landing just after cancel() took the future's lock (in
    ``Condition.__enter__``, Python code) kept that lock for ever: the job's
    end could not settle the future ("left unsettled")."""
    with Executor(nodes=local1) as executor, python_handles_sigint():
        for point in itertools.count(1):
            running = executor.submit(time.sleep, 0.2)
            queued = executor.submit(mul, 2, 3)
            sigint = SigintAtCReturn(point)
            with contextlib.suppress(KeyboardInterrupt):
                try:
                    sys.setprofile(sigint)
                    queued.cancel()
                finally:
                    sys.setprofile(None)
            running.result(WAIT)
            assert queued.cancelled() or queued.result(WAIT) == 6, point
            if not sigint.sent:  # past the last C call of cancel()
                break
    assert point > 10  # the points were tried (the last sent no SIGINT)


def boom() -> None:
    raise ValueError("boom")


@pytest.mark.parametrize("call", ["result", "exception"])
@pytest.mark.parametrize("outcome", ["value", "error"])
def test_ctrl_c_anywhere_in_reading_a_future_leaves_its_lock_free(
    executor, call, outcome
):
    """A Ctrl-C after each C call ``result()`` / ``exception()`` makes in turn,
    on a future done: other threads can still use the future (a done callback).
    ``Future.result`` took its lock in ``Condition.__enter__`` (Python code): one
    landing just after the acquire kept the lock for ever."""
    future = executor.submit(boom) if outcome == "error" else executor.submit(abs, -1)
    future.exception(WAIT)  # done
    with python_handles_sigint():
        for point in itertools.count(1):
            sigint = SigintAtCReturn(point)
            with contextlib.suppress(KeyboardInterrupt, ValueError):
                try:
                    sys.setprofile(sigint)
                    getattr(future, call)()
                finally:
                    sys.setprofile(None)
            seen = threading.Event()
            other = threading.Thread(  # daemon: a thread blocked for ever fails
                target=future.add_done_callback,
                args=(lambda f, seen=seen: seen.set(),),
                daemon=True,
            )
            other.start()
            other.join(WAIT)
            assert seen.is_set(), f"the future's lock is held after a Ctrl-C at {point}"
            if not sigint.sent:  # past the last C call
                break


def test_ctrl_c_anywhere_in_add_done_callback_leaves_a_future_that_settles(local1):
    """A Ctrl-C after each C call ``add_done_callback`` makes in turn, on a call
    queued behind a running one: the future still settles, and the callbacks
    given run. One landing just after it took the future's lock (in
    ``Condition.__enter__``, Python code) kept that lock for ever: the job's end
    could not settle the future ("left unsettled")."""
    with Executor(nodes=local1) as executor, python_handles_sigint():
        for point in itertools.count(1):
            running = executor.submit(time.sleep, 0.1)
            queued = executor.submit(mul, 2, 3)
            called = threading.Event()
            sigint = SigintAtCReturn(point)
            with contextlib.suppress(KeyboardInterrupt):
                try:
                    sys.setprofile(sigint)
                    queued.add_done_callback(lambda f, called=called: called.set())
                finally:
                    sys.setprofile(None)
            running.result(WAIT)
            assert queued.result(WAIT) == 6, point
            if not sigint.sent:  # past the last C call: the callback was given
                assert called.wait(WAIT)
                break
    assert point > 1  # the points were tried (the last sent no SIGINT)


def test_done_callbacks_run_once_off_the_io_thread(executor):
    calls: list[tuple[object, str]] = []
    done = threading.Event()

    def callback(future: cf.Future) -> None:
        calls.append((future.result(), threading.current_thread().name))
        done.set()

    future = executor.submit(mul, 6, 7)
    future.add_done_callback(callback)
    assert done.wait(WAIT)
    future.add_done_callback(callback)  # done: called at once, in this thread
    assert calls == [(42, calls[0][1]), (42, threading.current_thread().name)]
    assert calls[0][1] != "dispynb-io"


# -- shutdown ------------------------------------------------------------------------


def test_submit_and_map_after_shutdown_raise_runtime_error(local):
    executor = Executor(nodes=local)
    executor.shutdown()
    executor.shutdown()  # again: nothing happens
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(mul, 1, 2)
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.map(mul, [1], [2])


def test_context_manager_waits_for_the_futures(local):
    with Executor(nodes=local) as executor:
        futures = [executor.submit(mul, i, i) for i in range(10)]
    assert all(future.done() for future in futures)
    assert [future.result(0) for future in futures] == [i * i for i in range(10)]
    with pytest.raises(RuntimeError):
        executor.submit(mul, 1, 1)


def test_shutdown_cancel_futures_cancels_the_queued_ones(local, tmp_path):
    executor = Executor(nodes=local)
    send_ahead(executor)
    gate = Gate(tmp_path)
    running = [gate.submit(executor, i) for i in range(2)]
    queued = [executor.submit(mul, i, 2) for i in range(6)]
    for future in running:
        gate.started(future)
    executor.shutdown(wait=False, cancel_futures=True)
    # At once: not after the running calls (a node answers the cancel of a job
    # sent ahead to a busy worker only when its running job ends).
    assert not any(future.done() for future in running)
    gate.open()
    assert [future.result(WAIT) for future in running] == [0, 1]
    assert executor._closed.wait(WAIT)
    # Cancelled; or, as ProcessPoolExecutor's calls already handed to a process,
    # run: the gate opened before its cancel reached the node.
    for i, future in enumerate(queued):
        assert future.cancelled() or future.result(0) == i * 2


def test_shutdown_cancel_futures_cancels_a_maps_queued_calls(local, tmp_path):
    """A ``map``'s jobs have no futures of their own: shutdown cancels them too,
    and reading the map raises `CancelledError` at the first call cancelled."""
    executor = Executor(nodes=local)
    gate = Gate(tmp_path)
    running = [gate.submit(executor, i) for i in range(2)]  # both CPUs busy
    for future in running:
        gate.started(future)
    touched = [tmp_path / f"mapped-{i}" for i in range(8)]
    results = executor.map(Path.touch, touched)  # queued behind the gate
    executor.shutdown(wait=False, cancel_futures=True)
    wait_until(lambda: executor.cluster.job_counts["Cancelled"] == 8)
    gate.open()
    assert [future.result(WAIT) for future in running] == [0, 1]
    assert executor._closed.wait(WAIT)
    assert not any(path.exists() for path in touched)
    with pytest.raises(cf.CancelledError):
        next(results)


def test_shutdown_without_wait_returns_at_once_and_finishes_the_work(local, tmp_path):
    executor = Executor(nodes=local)
    gate = Gate(tmp_path)
    future = gate.submit(executor, "finished")
    gate.started(future)
    executor.shutdown(wait=False)
    assert not future.done() and not executor._closed.is_set()
    gate.open()
    assert future.result(WAIT) == "finished"
    assert executor._closed.wait(WAIT)


@pytest.mark.parametrize("when", ["in the block", "as its end waits"])
def test_an_interrupt_in_the_with_block_terminates_the_running_calls(
    local, tmp_path, when
):
    """Ctrl-C inside ``with Executor()``, or as its end waits for the calls (a
    real SIGINT): the queued calls are cancelled, the running ones terminated.
    At its end, before, the interrupt left them running on the executor shut
    down, its cluster open."""
    gate = Gate(tmp_path)  # never opened: the calls would hold for WAIT s
    at_end = when == "as its end waits"
    waiting = main_waits_in_function("wait_for", "dispynb._interruptible")
    with (
        pytest.raises(KeyboardInterrupt),
        sigint_when(waiting) if at_end else contextlib.nullcontext(),
        Executor(nodes=local) as executor,
    ):
        send_ahead(executor)
        running = [gate.submit(executor, i) for i in range(2)]
        touched = [str(tmp_path / f"queued-{i}") for i in range(4)]
        queued = [executor.submit(Path.touch, Path(t)) for t in touched]  # ahead too
        for future in running:
            gate.started(future)
        if not at_end:
            raise KeyboardInterrupt  # Ctrl-C, or the notebook's Stop
    assert ended(tmp_path) == []
    assert not any(os.path.exists(t) for t in touched)
    assert all(future.cancelled() for future in queued)
    for future in running:
        assert future.done()  # terminated, not waited for
        with pytest.raises(RemoteError):
            future.result(0)


@pytest.mark.parametrize(
    "how", [{}, {"cancel_futures": True}, {"wait": False, "cancel_futures": True}]
)
def test_ctrl_c_anywhere_in_the_executors_shutdown_leaves_one_that_ends(local, how):
    """A Ctrl-C after each C call the executor's own ``shutdown`` code makes in
    turn: then ``shutdown`` again closes the executor. One landing after it had
    marked the executor shut, before it began to close it, made every later
    ``shutdown`` wait for ever."""
    for point in itertools.count(1):
        executor = Executor(nodes=local)
        assert executor.submit(mul, 2, 3).result(WAIT) == 6
        sigint = SigintAtCReturn(point, "dispynb.executor")
        with python_handles_sigint(), contextlib.suppress(KeyboardInterrupt):
            try:
                sys.setprofile(sigint)
                executor.shutdown(**how)
            finally:
                sys.setprofile(None)
        again = threading.Thread(target=executor.shutdown, daemon=True)
        again.start()
        again.join(WAIT)
        assert not again.is_alive(), f"shutdown hangs after a Ctrl-C at {point}"
        assert executor._closed.is_set()
        if not sigint.sent:  # past the last C call of the executor's shutdown
            break
    assert point > 1  # the points were tried (the last sent no SIGINT)


def test_ctrl_c_anywhere_in_the_executors_start_leaves_no_node_running():
    """A Ctrl-C after each C call the executor's own ``__init__`` code makes in
    turn: no node it started is left running (the user has no executor to shut
    down). Landing after its local nodes started and before the ``try`` that
    closes them on errors, it left them running until the interpreter's exit."""
    me = psutil.Process()
    before = {child.pid for child in me.children(recursive=True)}
    for point in itertools.count(1):
        sigint = SigintAtCReturn(point, "dispynb.executor")
        executor = None
        with python_handles_sigint(), contextlib.suppress(KeyboardInterrupt):
            try:
                sys.setprofile(sigint)
                executor = Executor(max_workers=1)
            finally:
                sys.setprofile(None)
        if executor is not None:
            executor.shutdown()
        started = [c for c in me.children(recursive=True) if c.pid not in before]
        _gone, alive = psutil.wait_procs(started, timeout=WAIT)
        assert alive == [], f"nodes left running after a Ctrl-C at {point}"
        if not sigint.sent:  # past the last C call of the executor's start
            break
    assert point > 1  # the points were tried (the last sent no SIGINT)


def test_executor_on_named_nodes_with_their_secret(local):
    """As with nodes started by hand: name them and give the shared secret."""
    host, port = local.addresses[0]
    with Executor(nodes=[f"{host}:{port}"], secret=local.secret) as executor:
        assert executor.cpus == 2
        assert list(executor.map(mul, [1, 2, 3], [4, 5, 6])) == [4, 10, 18]
        assert executor.submit(os.getpid).result(WAIT) != os.getpid()


def test_default_executor_starts_and_stops_its_own_local_nodes():
    with Executor(max_workers=1) as executor:
        assert executor.cpus == 1
        assert list(executor.map(mul, [1, 2], [3, 4])) == [3, 8]
        nodes = [psutil.Process(proc.pid) for proc in executor._local._procs]
    assert not any(proc.is_running() for proc in nodes)


def test_an_unknown_keyword_is_the_executors_error_before_any_node_starts(
    monkeypatch,
):
    """ProcessPoolExecutor's mp_context, or a typo: the error names Executor() (not
    JobCluster(), which the user never called) and the close match, and comes
    before the executor starts its local nodes."""
    started: list[object] = []
    monkeypatch.setattr(
        LocalCluster, "__init__", lambda self, *args, **kw: started.append(self)
    )
    with pytest.raises(TypeError, match=r"^Executor\(\) takes no mp_context"):
        Executor(mp_context=object())
    with pytest.raises(
        TypeError,
        match=r"^Executor\(\) got an unexpected keyword argument 'max_worker' "
        r"\(did you mean 'max_workers'",
    ):
        Executor(max_worker=2)
    with pytest.raises(TypeError, match=r"'job_timeut' \(did you mean 'job_timeout'"):
        Executor(job_timeut=3)
    assert started == []
