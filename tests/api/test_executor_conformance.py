"""One matrix, two executors: each test runs on `concurrent.futures.ProcessPoolExecutor`
and on `dispynb.Executor` (a real local node), and asserts what a user of the
standard one sees. Where dispynb differs on purpose (docs/howto/futures.md, "Where it
differs"), the test says so and asserts both sides.

Functions here are module-level: the pool's forked workers import them, dispynb
ships them by value.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool

import pytest

from dispynb import LocalCluster
from dispynb.errors import RemoteError
from dispynb.executor import Executor
from tests.jobs import WAIT, wait_for_path

pytestmark = pytest.mark.slow


def ident(x: object) -> object:
    return x


def nap(x: object, seconds: float) -> object:
    time.sleep(seconds)
    return x


def gated(x: object, gate: str, started: str = "") -> object:
    """``x``, once the file ``gate`` exists (the test opens it); first the file
    ``started``, if named, is made (the call is in a worker)."""
    if started:
        open(started, "w").close()
    while not os.path.exists(gate):
        time.sleep(0.01)
    return x


def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


def boom_on_2(x: int) -> int:
    if x == 2:
        raise ValueError("two")
    return x


def interrupt() -> None:
    raise KeyboardInterrupt("in the call")


def leave(code: int) -> None:
    raise SystemExit(code)


def die(code: int) -> None:
    os._exit(code)


@pytest.fixture(params=["ProcessPoolExecutor", "dispynb"])
def make(request: pytest.FixtureRequest, local: LocalCluster) -> Iterator[object]:
    """A factory of executors of either kind (2 workers); each made is shut down."""
    made: list[cf.Executor] = []

    def new() -> cf.Executor:
        executor: cf.Executor = (
            cf.ProcessPoolExecutor(2)
            if request.param == "ProcessPoolExecutor"
            else Executor(nodes=local)
        )
        made.append(executor)
        return executor

    new.kind = request.param  # type: ignore[attr-defined]
    yield new
    for executor in made:
        executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def executor(make) -> cf.Executor:
    return make()


def test_results_exceptions_and_timeouts(executor) -> None:
    assert executor.submit(ident, 5).result(WAIT) == 5
    assert executor.submit(dict, fn=1).result(WAIT) == {"fn": 1}  # fn: positional
    future = executor.submit(boom, 1)
    with pytest.raises(ValueError, match=r"^boom 1$"):
        future.result(WAIT)
    assert repr(future.exception(WAIT)) == "ValueError('boom 1')"
    assert future.exception(WAIT).__cause__ is not None  # the remote traceback
    slow = executor.submit(nap, 1, 1.0)
    with pytest.raises(TimeoutError):
        slow.result(timeout=0)
    assert slow.result(WAIT) == 1


def test_map_order_shortest_input_timeout_and_error_at_its_place(executor) -> None:
    assert list(executor.map(ident, range(5), chunksize=2)) == [0, 1, 2, 3, 4]
    assert list(executor.map(pow, [1, 2, 3], [2, 2])) == [1, 4]
    assert list(executor.map(ident, [])) == []
    results = executor.map(boom_on_2, [1, 2, 3])
    assert next(results) == 1
    with pytest.raises(ValueError, match="two"):
        next(results)
    with pytest.raises(TimeoutError):
        list(executor.map(nap, [1, 2], [2, 2], timeout=0.05))


def test_as_completed_and_wait(executor) -> None:
    one = executor.submit(ident, 1)
    assert [f.result() for f in cf.as_completed([one, one], timeout=WAIT)] == [1]
    failing = executor.submit(boom, 2)
    longer = executor.submit(nap, 3, 2.0)
    done, pending = cf.wait(
        [failing, longer], timeout=WAIT, return_when=cf.FIRST_EXCEPTION
    )
    assert done == {failing} and pending == {longer}
    slow = [executor.submit(nap, i, 2.0) for i in range(2)]
    with pytest.raises(TimeoutError, match=r"^2 \(of 2\) futures unfinished$"):
        list(cf.as_completed(slow, timeout=0.1))
    done, pending = cf.wait(slow, timeout=0)
    assert (done, pending) == (set(), set(slow))
    done, pending = cf.wait([*slow, longer], timeout=WAIT)
    assert done == {*slow, longer} and pending == set()


def test_done_callbacks(executor) -> None:
    """Added to a done future: called at once, in the caller's thread."""
    future = executor.submit(ident, 1)
    assert future.result(WAIT) == 1
    threads: list[threading.Thread] = []
    future.add_done_callback(lambda f: threads.append(threading.current_thread()))
    assert threads == [threading.current_thread()]
    called = threading.Event()
    executor.submit(ident, 2).add_done_callback(lambda f: called.set())
    assert called.wait(WAIT)


def test_a_calls_keyboard_interrupt_and_system_exit_come_back_as_themselves(
    executor,
) -> None:
    with pytest.raises(KeyboardInterrupt):
        executor.submit(interrupt).result(WAIT)
    with pytest.raises(SystemExit) as info:
        executor.submit(leave, 5).result(WAIT)
    # Not .code: once dask or distributed is imported (tblib's pickling, for the
    # whole test run), the pool's SystemExit comes back with code None.
    assert info.value.args == (5,)
    assert executor.submit(ident, 3).result(WAIT) == 3  # the workers live on


def test_running_then_done(executor) -> None:
    future = executor.submit(nap, 1, 1.0)
    deadline = time.monotonic() + WAIT
    while not future.running() and not future.done():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert future.result(WAIT) == 1
    assert future.done() and not future.running() and not future.cancelled()


def test_shutdown_then_submit_and_shutdown_again(make) -> None:
    executor = make()
    assert executor.submit(ident, 1).result(WAIT) == 1
    executor.shutdown()
    with pytest.raises(
        RuntimeError, match=r"^cannot schedule new futures after shutdown$"
    ):
        executor.submit(ident, 1)
    executor.shutdown()  # again: nothing to do
    with make() as other:
        pass
    with pytest.raises(RuntimeError, match="after shutdown"):
        other.submit(ident, 1)


def test_cancel_futures_cancels_what_has_not_started(make) -> None:
    executor = make()
    futures = [executor.submit(nap, i, 0.5) for i in range(12)]
    executor.shutdown(wait=True, cancel_futures=True)
    cancelled = [f for f in futures if f.cancelled()]
    assert cancelled, "some calls waited behind the 2 workers"
    for future in futures:
        assert future.done()
        if future not in cancelled:
            assert future.result(0) in range(12)


def test_a_call_ending_its_process(make) -> None:
    """Differs on purpose: ProcessPoolExecutor breaks (BrokenProcessPool, every
    later submit too); dispynb's node replaces the worker, the call raises
    `RemoteError` saying what happened (once), and the executor goes on."""
    executor = make()
    future = executor.submit(die, 3)
    if make.kind == "ProcessPoolExecutor":
        with pytest.raises(BrokenProcessPool):
            future.result(WAIT)
        with pytest.raises(BrokenProcessPool):
            executor.submit(ident, 2)
        return
    with pytest.raises(RemoteError) as info:
        future.result(WAIT)
    said = str(info.value)
    # Which call and job, on which node, why, and what to do, in plain words.
    assert said.startswith("the call die(...) (job "), said
    assert (
        " on node 127.0.0.1 failed (Terminated): the job's worker process exited "
        "with status 3 (os._exit() "
    ) in said, said
    assert "run it here to see why" in said, said
    assert said.count("exited with status 3") == 1, said  # not again as a traceback
    assert executor.submit(ident, 2).result(WAIT) == 2


def test_a_non_callable_raises_from_result_not_at_submit(executor) -> None:
    """As the pool's worker calls it: ``submit(42)`` returns a future, and the
    ``TypeError`` is raised by ``result()``; ``map`` raises it as it is iterated."""
    future = executor.submit(42)
    with pytest.raises(TypeError, match=r"^'int' object is not callable$"):
        future.result(WAIT)
    assert future.exception(WAIT).__cause__ is not None  # the remote traceback
    results = executor.map(42, [1, 2])
    with pytest.raises(TypeError, match=r"^'int' object is not callable$"):
        next(results)
    assert executor.submit(ident, 4).result(WAIT) == 4


@pytest.fixture
def gate(tmp_path) -> Iterator[str]:
    """A prefix of gate files (`gated`); all open when the test ends, whatever
    happened (the executors are shut down waiting for their calls)."""
    prefix = str(tmp_path / "gate")
    try:
        yield prefix
    finally:
        for i in range(2):
            open(f"{prefix}{i}", "w").close()


def _submit_behind_two(executor, gate: str) -> tuple[list[cf.Future], cf.Future]:
    """Two calls running in the workers, one until the file ``gate0`` exists,
    the other until ``gate1`` does; four waiting for a worker (three fill the
    pool's queue; the fourth is the one its manager thread moves in when the
    first call ends, which a loaded machine may let it do before it reports that
    call's end); a last one behind them, still pending when the first ends (its
    ``cancel()`` returns True): the first two calls, and the last."""
    first = [
        executor.submit(gated, i, f"{gate}{i}", f"{gate}{i}.started") for i in range(2)
    ]
    for i in range(2):
        wait_for_path(f"{gate}{i}.started")
    for i in range(4):
        executor.submit(gated, 2 + i, f"{gate}1")
    return first, executor.submit(gated, 9, f"{gate}1")


def test_a_queued_call_cancelled_its_callback_result_and_wait(make, gate) -> None:
    """``cancel()`` of a call waiting behind busy workers: True, its callbacks
    have run when it returns (seeing it cancelled: they ran later, on the
    callback thread, for a call the node had to answer for), ``result()`` and
    ``exception()`` raise ``CancelledError``; a running call is not cancelled."""
    executor = make()
    running, queued = _submit_behind_two(executor, gate)
    # Another call's slow callback: dispynb's callback thread is busy meanwhile.
    running[0].add_done_callback(lambda f: time.sleep(0.5))
    open(f"{gate}0", "w").close()
    seen: list[bool] = []
    queued.add_done_callback(lambda f: seen.append(f.cancelled()))
    assert queued.cancel() and queued.cancelled() and queued.done()
    assert seen == [True]
    with pytest.raises(cf.CancelledError):
        queued.result(0)
    with pytest.raises(cf.CancelledError):
        queued.exception(0)
    assert not running[1].cancel()
    open(f"{gate}1", "w").close()
    done, pending = cf.wait([*running, queued], timeout=WAIT)
    assert queued in done
    assert pending == set() and [f.result() for f in running] == [0, 1]


def test_a_done_callback_may_submit_the_next_call(executor) -> None:
    """Chained from callbacks (which run on another thread): no deadlock."""
    chain: list[int] = []
    finished = threading.Event()

    def step(future: cf.Future) -> None:
        chain.append(future.result())
        if len(chain) < 5:
            executor.submit(ident, len(chain)).add_done_callback(step)
        else:
            finished.set()

    executor.submit(ident, 0).add_done_callback(step)
    assert finished.wait(WAIT)
    assert chain == [0, 1, 2, 3, 4]


def test_cancel_waits_for_no_other_calls_callback(make, gate) -> None:
    """Another call's callback waits for a lock this thread holds: ``cancel()``
    of a queued call still returns at once, its own callback run (dispynb waited
    for every callback queued before, up to 30 s, and returned without it)."""
    executor = make()
    (ends, _), queued = _submit_behind_two(executor, gate)
    lock = threading.Lock()
    blocked = threading.Event()

    def waits_for_lock(future: cf.Future) -> None:
        blocked.set()
        with lock:
            pass

    seen: list[bool] = []
    with lock:
        ends.add_done_callback(waits_for_lock)
        open(f"{gate}0", "w").close()
        assert blocked.wait(WAIT)  # the callbacks' thread waits for our lock
        queued.add_done_callback(lambda f: seen.append(f.cancelled()))
        assert queued.cancel()
        assert seen == [True]
    open(f"{gate}1", "w").close()
    assert not cf.wait([ends, queued], timeout=WAIT).not_done


def test_cancel_from_a_callback_runs_the_cancelled_ones_callbacks(make, gate) -> None:
    """A callback cancelling a queued call: True, that call's callbacks run by
    then (dispynb's ran later, behind the cancelling one), no deadlock."""
    executor = make()
    (ends, _), queued = _submit_behind_two(executor, gate)
    seen: list[bool] = []
    queued.add_done_callback(lambda f: seen.append(f.cancelled()))
    answers: list[tuple[bool, list[bool]]] = []
    answered = threading.Event()

    def cancel_queued(future: cf.Future) -> None:
        answers.append((queued.cancel(), list(seen)))
        answered.set()

    ends.add_done_callback(cancel_queued)
    open(f"{gate}0", "w").close()
    assert answered.wait(WAIT)
    assert answers == [(True, [True])]
    open(f"{gate}1", "w").close()
    assert not cf.wait([ends, queued], timeout=WAIT).not_done
