"""Tests of `dispynb.executor`'s ``map``, ``wait``, ``as_completed``, cancel and done
callbacks: what CPython's ProcessPoolExecutor tests check, on a real local node."""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import threading
from pathlib import Path

import pytest

from dispynb.executor import Executor
from tests.api.executorwork import Gate, ended, hold, mul, send_ahead
from tests.jobs import WAIT, wait_for_path, wait_until

pytestmark = pytest.mark.slow


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


def test_buffersize_submits_the_next_input_before_waiting_as_python_3_14(
    executor, tmp_path
):
    """Python 3.14's map submits the next input as each value is asked for,
    then waits: with ``buffersize=1`` two calls run while the first value is
    awaited. It waited first: one call at a time."""
    markers = [str(tmp_path / f"m{i}") for i in range(3)]
    release = str(tmp_path / "release")
    results = executor.map(hold, markers, [release] * 3, range(3), buffersize=1)
    first = threading.Thread(target=next, args=(results,))
    first.start()
    try:
        wait_for_path(markers[0])
        wait_until(lambda: os.path.exists(markers[1]), timeout=5)
        assert not os.path.exists(markers[2])
    finally:
        Path(release).touch()
        first.join(WAIT)
    assert list(results) == [1, 2]
    with pytest.raises(TypeError, match="buffersize must be an integer or None"):
        executor.map(mul, [1], [2], buffersize=1.5)


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


def objects_kept(_: int) -> int:
    """Bytes of the objects this node worker keeps loaded (`dispynb.objects`)."""
    from dispynb import objects

    return sum(len(value) for value in objects._cache.values())


def test_maps_of_large_closures_leave_nothing_loaded_on_the_node(local1):
    """Each ``map`` of a function closing over a large array (another array each
    time: a notebook's loop over models) puts the function once for its chunks
    (`Executor._carrier`). Its worker kept every such function loaded until the
    executor closed, 2 MiB more per map here (100 MB models: a node out of
    memory), where a large function carried by its job went with the job. Now
    nothing is kept once a job has used it."""
    with Executor(nodes=local1) as executor:
        for _ in range(3):
            table = os.urandom(2 << 20)
            assert list(executor.map(lambda i, t=table: t[i], range(4))) == list(
                table[:4]
            )
        assert list(executor.map(objects_kept, range(2))) == [0, 0]


def test_maps_of_large_closures_put_no_more_than_the_budget(local1, monkeypatch):
    """What an executor puts of its large functions (`Executor._carrier`) stays on
    the client's disk and each node's until it closes: a loop mapping another
    large closure each time (a notebook's models) grew both by its size at each
    map, /tmp often in RAM. At most `PUT_BUDGET` bytes are put; past it the
    functions travel with their jobs, as before, and the results are the same."""
    from dispynb import executor as executor_module

    monkeypatch.setattr(executor_module, "PUT_BUDGET", 5 << 20, raising=False)
    with Executor(nodes=local1) as executor:
        for _ in range(4):
            table = os.urandom(2 << 20)
            assert list(executor.map(lambda i, t=table: t[i], range(4))) == list(
                table[:4]
            )
        put = executor.cluster._objects_dir
        assert put is not None  # the first two were put
        held = sum(entry.stat().st_size for entry in os.scandir(put))
        assert 4 << 20 < held <= 5 << 20
