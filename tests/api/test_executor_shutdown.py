"""Tests of `dispynb.executor`'s start and shutdown, and of a Ctrl-C anywhere in them
or in a future's methods: the executor and its futures end, nothing is left running."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import gc
import itertools
import os
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from dispynb import LocalCluster
from dispynb.errors import RemoteError
from dispynb.executor import Executor
from tests.api.executorwork import Gate, ended, mul, send_ahead
from tests.jobs import WAIT, wait_until
from tests.sigint import (
    SigintAtCReturn,
    main_waits_in_function,
    python_handles_sigint,
    sigint_when,
)

pytestmark = pytest.mark.slow


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


def test_an_executor_dropped_unshut_finishes_its_calls_then_stops_its_nodes(
    tmp_path,
):
    """As a ProcessPoolExecutor garbage collected: its pending calls run to
    their end, then its processes stop. Its local nodes ran until the
    interpreter exited (an executor made again in a loop or a notebook cell
    kept every earlier one's nodes)."""
    gate = Gate(tmp_path)
    executor = Executor(max_workers=1)
    pids = executor._local.pids
    running = gate.submit(executor, "ran")
    gate.started(running)
    del executor
    gc.collect()
    gate.open()
    assert running.result(WAIT) == "ran"
    wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids))


def exit_call() -> None:
    sys.exit(3)


def interrupt_call() -> None:
    raise KeyboardInterrupt("the call's own")


@pytest.mark.parametrize(
    "leaving", ["sys.exit()", "a call's KeyboardInterrupt", "a call's SystemExit"]
)
def test_leaving_the_with_block_otherwise_waits_for_the_calls(local, tmp_path, leaving):
    """As ProcessPoolExecutor's ``with``: only an interrupt (Ctrl-C, the
    notebook's Stop) terminates the running calls. ``sys.exit()`` in the block,
    or a call's own KeyboardInterrupt or SystemExit re-raised by ``result()``,
    waits for them: they were terminated."""
    gate = Gate(tmp_path)
    executor = Executor(nodes=local)
    opener = threading.Thread(
        target=lambda: (wait_until(lambda: executor._shut), gate.open())
    )
    with pytest.raises((SystemExit, KeyboardInterrupt)), executor:
        running = gate.submit(executor, "ran")
        gate.started(running)
        opener.start()  # once the block's end waits
        if leaving == "sys.exit()":
            sys.exit(3)
        call = interrupt_call if "Keyboard" in leaving else exit_call
        executor.submit(call).result(WAIT)
    opener.join(WAIT)
    assert running.result(0) == "ran" and len(ended(tmp_path)) == 1
    assert executor._closed.is_set()


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


def test_own_local_nodes_send_results_as_large_as_max_message_size_allows():
    """A result over 1 GiB (what ProcessPoolExecutor returns) needs the nodes'
    limit raised with the client's: the executor starts its nodes with it. (A
    real 1 GiB result costs seconds and GiBs of memory: the node's limit is read
    from its command line; measured by hand: 1.2 GB came back in 8 s.)"""
    size = 3 << 30
    with Executor(max_workers=1, max_message_size=size) as executor:
        assert executor.submit(mul, 6, 7).result(WAIT) == 42
        (node,) = [psutil.Process(proc.pid) for proc in executor._local._procs]
        line = node.cmdline()
    assert line[line.index("--max-message-size") + 1] == str(size)


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
