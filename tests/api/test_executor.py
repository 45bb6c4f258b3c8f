"""Tests of `dispynb.executor`: the behaviours CPython's own ProcessPoolExecutor tests
check (Lib/test/test_concurrent_futures), on a real local node.

Functions here are module-level (shipped by value) or closures and lambdas; a job
that must be seen running holds until the test creates a release file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import pytest

import dispynb
from dispynb.errors import RemoteError, SerializationError, SetupError
from dispynb.executor import Executor
from dispynb.executorfailures import executor_advice
from dispynb.protocol import serialize
from tests.api.executorwork import Gate, ended, mul, send_ahead
from tests.jobs import WAIT, wait_until

pytestmark = pytest.mark.slow


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
    with pytest.raises(TypeError):  # from result(), as ProcessPoolExecutor's
        executor.submit(42).result(WAIT)


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


class Checker:
    """A callable instance: the call runs its ``__call__``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __call__(self, x: int) -> int:
        if x > self.limit:
            raise OverflowError(f"{x} over {self.limit}")
        return x


def test_a_callable_instances_traceback_shows_its_file_and_lines(executor):
    """Its ``__call__`` (any method named with dunders) was left out of the
    code mapped back: its frame read ``File "<dynamic-code>"``."""
    with pytest.raises(OverflowError) as info:
        executor.submit(Checker(1), 2).result(WAIT)
    text = info.value.__cause__.traceback
    assert f'File "{__file__}", line ' in text and "<dynamic-code>" not in text
    assert '    raise OverflowError(f"{x} over {self.limit}")\n' in text


def make_generator() -> object:
    return (i for i in range(3))


async def fetch(x: int) -> int:
    await asyncio.sleep(0)
    return x * 2


async def fail_async(x: int) -> int:
    await asyncio.sleep(0)
    raise LookupError(f"async {x}")


def test_an_async_function_runs_to_completion_on_the_node(executor):
    """As Dask's ``client.submit`` does (ProcessPoolExecutor's worker fails to
    pickle the coroutine): its value comes back, its exception is itself with
    the coroutine's traceback, not the event loop's frames."""
    assert executor.submit(fetch, 1).result(WAIT) == 2
    assert list(executor.map(fetch, [2, 3], chunksize=2)) == [4, 6]
    with pytest.raises(LookupError, match="async 4") as info:
        executor.submit(fail_async, 4).result(WAIT)
    text = info.value.__cause__.traceback
    line = fail_async.__code__.co_firstlineno + 2
    assert f'File "{__file__}", line {line}, in fail_async\n' in text, text
    assert "asyncio" not in text.replace("await asyncio.sleep", ""), text


async def sleep_async(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def count_async(n: int):
    for i in range(n):
        yield i


def test_an_async_generator_says_to_return_a_list_of_what_it_yields(executor):
    """As a generator's: it cannot be sent back, and the advice fits it (it said
    to return asyncio.run(...) of it, which refuses an async generator)."""
    with pytest.raises(RemoteError) as info:
        executor.submit(count_async, 2).result(WAIT)
    said = str(info.value)
    assert "'async_generator' that cannot be pickled" in said, said
    assert "return [x async for x in ...], run with asyncio.run)" in said, said
    assert "return asyncio.run(...))" not in said, said


def test_job_timeout_stops_an_async_call(local):
    """The node's interrupt ends the event loop's run: the call is terminated
    as a plain function's is."""
    with Executor(nodes=local, job_timeout=0.5) as ex:
        future = ex.submit(sleep_async, 30)
        with pytest.raises(RemoteError, match=r"limit of 0\.5 s"):
            future.result(WAIT)
    assert future.job.status == dispynb.DispyJob.Terminated


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


def test_a_result_over_max_result_size_says_how_to_allow_more(local):
    """The node's advice names the executor's arguments, not a cluster's."""
    with Executor(nodes=local, max_result_size=1000) as ex:
        with pytest.raises(RemoteError) as info:
            ex.submit(bytes, 5000).result(WAIT)
        with pytest.raises(RemoteError) as mapped:
            list(ex.map(bytes, [10, 5000], chunksize=2))
    for error in (info.value, mapped.value):
        text = str(error)
        assert "ResultTooLarge" in text
        assert "Executor(..., max_result_size=" in text
        assert "give the cluster" not in text
    # Over the default 1 GiB, the message size (the local nodes' too) must grow.
    over = executor_advice(
        "pickles to 1200000000 bytes, over the limit of 1039138816 bytes "
        "(max_result_size): return less, or give the cluster a larger max_result_size"
    )
    assert over.endswith(
        "Executor(..., max_message_size=2400000000, max_result_size=2400000000)"
    )


def test_a_result_over_what_the_nodes_take_says_to_raise_their_message_size():
    """A larger max_result_size cannot let a result over the nodes' own max
    message size through (the advice was to give one): the advice given works."""
    # 6 MiB: under the client's cap (8 MiB less 1 MiB for a header), over what a
    # node's 8 MiB messages leave beside a job's output kept whole (two streams
    # of 256 K characters, up to 6 bytes each).
    size = 6 << 20
    small = 8 << 20
    with (
        Executor(max_workers=1, max_message_size=small, max_output_size=None) as ex,
        pytest.raises(RemoteError) as info,
    ):
        ex.submit(bytes, size).result(WAIT)
    text = str(info.value)
    assert "(the node's max message size, less room for the job's output)" in text
    assert "max_result_size" not in text
    found = re.search(r"Executor\(\.\.\., max_message_size=(\d+)\)", text)
    assert found, text
    larger = int(found[1])
    with Executor(max_workers=1, max_message_size=larger, max_output_size=None) as ex:
        assert ex.submit(bytes, size).result(WAIT) == bytes(size)


def test_a_call_raising_keyboard_interrupt_raises_it_as_process_pools_do(executor):
    """ProcessPoolExecutor's worker catches BaseException: ``result()`` raises the
    call's KeyboardInterrupt itself (it came back as RemoteError, ending its job
    and the other calls of its map chunk); its traceback names this file."""
    where = f'File "{__file__}", line '
    source = '    raise KeyboardInterrupt(f"stop {x}")\n'
    future = executor.submit(interrupt, 1)
    with pytest.raises(KeyboardInterrupt, match="stop 1") as info:
        future.result(WAIT)
    assert future.job.status == dispynb.DispyJob.Finished  # the call raised, not it
    text = info.value.__cause__.traceback
    assert where in text and source in text and "<dynamic-code>" not in text
    results = executor.map(interrupt_on_2, range(4), chunksize=4)
    assert next(results) == 0 and next(results) == 1
    with pytest.raises(KeyboardInterrupt, match="stop 2"):
        next(results)
    assert executor.submit(mul, 2, 3).result(WAIT) == 6  # the executor goes on


def interrupt_on_2(x: int) -> int:
    if x == 2:
        interrupt(x)
    return x


def test_unpicklable_exception_becomes_remote_error(executor):
    future = executor.submit(raise_unpicklable)
    with pytest.raises(RemoteError) as info:
        future.result(WAIT)
    assert info.value.ename == "Unpicklable" and "stays on the node" in str(info.value)
    assert "raise_unpicklable" in info.value.traceback
    # Why not the exception itself (``except Unpicklable`` misses it), and the fix.
    assert info.value.traceback.endswith(
        "[dispynb: the Unpicklable raised cannot come back as itself (TypeError: "
        "no pickling), so it is raised as this RemoteError: an exception travels "
        "as its class called with its args, and its __dict__; give every "
        "argument of its __init__ to super().__init__(), keep no attribute that "
        "cannot be pickled, or define __reduce__]\n"
    )


def test_exception_that_does_not_unpickle_becomes_remote_error(executor):
    """A classic (ProcessPoolExecutor breaks its pool on it): the call's
    RemoteError names it, with its traceback; the other calls of its job
    (a map chunk) keep their values."""
    with pytest.raises(RemoteError, match="NeedsTwo: 2 and b") as failure:
        executor.submit(raise_needs_two_on_2, 2).result(WAIT)
    assert "raise_needs_two_on_2" in failure.value.traceback
    assert (
        "[dispynb: the NeedsTwo raised cannot come back as itself (TypeError: "
        "NeedsTwo.__init__() missing 1 required positional argument: 'second')"
    ) in failure.value.traceback
    results = executor.map(raise_needs_two_on_2, range(4), chunksize=4)
    assert next(results) == 0 and next(results) == 1
    with pytest.raises(RemoteError, match="NeedsTwo"):
        next(results)


def raise_node_only_on_1(x: int, where: str) -> int:
    """Raise, for x == 1, an exception of a module only this node imports."""
    path = Path(where, "nodeonly_errors.py")
    path.write_text("class NodeOnlyError(Exception):\n    pass\n")
    sys.path.insert(0, where)
    try:
        module = __import__("nodeonly_errors")
    finally:
        sys.path.remove(where)
    if x == 1:
        raise module.NodeOnlyError(f"from a library of the node's {x}")
    return x


def test_an_exception_of_a_module_only_the_node_has_keeps_its_traceback(
    executor, local, tmp_path
):
    """An exception whose class the client cannot import (a library installed
    on the nodes only) is a RemoteError with its traceback, saying why; the
    other calls of its chunk keep their values. Before, the job's outcomes
    could not be read: 'the result cannot be unpickled here', nothing else."""
    where = str(tmp_path)
    with pytest.raises(RemoteError) as info:
        executor.submit(raise_node_only_on_1, 1, where).result(WAIT)
    text = info.value.traceback
    assert "nodeonly_errors.NodeOnlyError: from a library of the node's 1" in text
    assert "raise module.NodeOnlyError(" in text  # the call's own line
    assert (
        "[dispynb: the NodeOnlyError raised cannot be unpickled here (cannot "
        "unpickle data: ModuleNotFoundError: No module named 'nodeonly_errors')"
    ) in text
    results = executor.map(raise_node_only_on_1, [0, 1, 2], [where] * 3, chunksize=3)
    assert next(results) == 0
    with pytest.raises(RemoteError, match="NodeOnlyError"):
        next(results)
    # One result_types refuses: its error says how to allow it.
    with (
        Executor(nodes=local, result_types=["builtins.int"]) as limited,
        pytest.raises(RemoteError) as refused,
    ):
        limited.submit(divmod, 1, 0).result(WAIT)
    assert refused.value.traceback.endswith(
        "add 'builtins.ZeroDivisionError' (or 'builtins.*') to result_types if the "
        "nodes may send it), so it is raised as this RemoteError]\n"
    )


class BadStr(Exception):
    """An exception whose message cannot be made."""

    def __str__(self) -> str:
        raise RuntimeError("no message")


def raise_bad_str_on_1(x: int) -> int:
    if x == 1:
        raise BadStr(x)
    return x


def test_an_exception_whose_str_fails_comes_back_as_itself(executor):
    """As ProcessPoolExecutor's (traceback prints '<exception str() failed>').
    Its str() raised in the executor's runner: the job failed as a whole, a
    RemoteError of the runner's frames, the other calls of its chunk lost."""
    with pytest.raises(BadStr) as info:
        executor.submit(raise_bad_str_on_1, 1).result(WAIT)
    assert info.value.__cause__.traceback.endswith("BadStr: <exception str() failed>\n")
    results = executor.map(raise_bad_str_on_1, range(3), chunksize=3)
    assert next(results) == 0
    with pytest.raises(BadStr):
        next(results)


class Lazy(Exception):
    """An exception whose missing attributes raise another error than
    AttributeError (``traceback`` looks up ``__notes__``)."""

    def __getattr__(self, name: str) -> object:
        raise LookupError(name)


def raise_lazy() -> None:
    raise Lazy("lazy")


def test_an_exception_that_traceback_cannot_format_comes_back_as_itself(executor):
    """ProcessPoolExecutor's worker breaks the pool on it; formatting it ended
    the node's worker (the call: 'exited with status 1')."""
    error = executor.submit(raise_lazy).exception(WAIT)  # pytest.raises reads
    assert type(error) is Lazy and error.args == ("lazy",)  # __notes__ too
    text = error.__cause__.traceback
    assert 'raise Lazy("lazy")' in text
    try:  # 3.13's traceback ignores the failing __notes__ lookup itself
        traceback.format_exception(Lazy("lazy"))
    except LookupError:
        assert text.endswith(
            "Lazy: <the exception cannot be formatted: LookupError: __notes__>\n"
        )
    else:
        assert "Lazy: lazy\n" in text


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


def test_a_scripts_helper_modules_travel_with_its_functions(
    executor, tmp_path, monkeypatch
):
    """A function of the script's package (or beside it) calling helpers in
    other modules of the script's, which ProcessPoolExecutor's workers import
    as the script does and no node can: the helpers travel by value too."""
    package = tmp_path / "scriptpkg_ship"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("def twice(x):\n    return 2 * x\n")
    (package / "work.py").write_text(
        "from scriptpkg_ship.helpers import twice\n"
        "from script_sibling_ship import thrice\n"
        "def work(x):\n"
        "    return twice(x) + thrice(x)\n"
    )
    (tmp_path / "script_sibling_ship.py").write_text(
        "def thrice(x):\n    return 3 * x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from scriptpkg_ship.work import work  # type: ignore[import-not-found]

    assert executor.submit(work, 2).result(WAIT) == 10
    assert list(executor.map(work, [1, 3])) == [5, 15]
    # Shipped for its function, a module named whole still goes by name: by
    # value, its data would travel with every job.
    (tmp_path / "script_data_ship.py").write_text(
        "DATA = b'x' * 1_000_000\ndef size():\n    return 7\n"
    )
    import script_data_ship  # type: ignore[import-not-found]

    def both() -> int:
        return size() + script_data_ship.size()

    size = script_data_ship.size
    serialize.ship_by_value(both)
    assert len(serialize.dumps_in_band(both)) < 10_000


def chatty(x: int) -> int:
    print(f"out {x}")
    print(f"err {x}", file=sys.stderr)
    return x


def test_what_calls_print_is_written_here_before_their_results(executor, capsys):
    """ProcessPoolExecutor's workers print to the script's terminal: so do the
    calls, each job's output before its result is returned."""
    assert executor.submit(chatty, 1).result(WAIT) == 1
    first = capsys.readouterr()
    assert (first.out, first.err) == ("out 1\n", "err 1\n")
    assert list(executor.map(chatty, [2, 3], chunksize=2)) == [2, 3]
    both = capsys.readouterr()
    assert (both.out, both.err) == ("out 2\nout 3\n", "err 2\nerr 3\n")


def warn_of(x: int) -> int:
    warnings.warn(f"careful {x}", stacklevel=1)
    return x


def test_warnings_of_calls_name_their_file_and_line(executor, capsys):
    """As a ProcessPoolExecutor's worker prints them: the file and line of the
    call's code and its source line, not ``<dynamic-code>:N`` (code sent by
    value), here and in ``future.job.stderr``."""
    line = warn_of.__code__.co_firstlineno + 1
    shown = (
        f"{__file__}:{line}: UserWarning: careful 1\n"
        '  warnings.warn(f"careful {x}", stacklevel=1)\n'
    )
    future = executor.submit(warn_of, 1)
    assert future.result(WAIT) == 1
    assert capsys.readouterr().err == shown
    assert future.job.stderr == shown
    assert list(executor.map(warn_of, [2], chunksize=1)) == [2]
    assert capsys.readouterr().err == shown.replace("careful 1", "careful 2")


def import_in_call(name: str) -> int:
    return __import__(name).VALUE


def test_a_module_imported_in_a_call_that_the_node_lacks_says_how_to_send_it(
    local, executor, tmp_path, monkeypatch
):
    """Imported by name on the node (no node has the script's directory, as
    ProcessPoolExecutor's workers do): the error says how to send it, in the
    executor's words, and doing so works."""
    (tmp_path / "beside_script_mod.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        executor.submit(import_in_call, "beside_script_mod").result(WAIT)
    assert info.value.__cause__.traceback.endswith(
        "the node cannot: send it with Executor(..., depends=[beside_script_mod]), "
        "or install it on the node)\n"
    )
    import beside_script_mod  # type: ignore[import-not-found]

    with Executor(nodes=local, depends=[beside_script_mod]) as ex:
        assert ex.submit(import_in_call, "beside_script_mod").result(WAIT) == 7


def test_a_call_given_its_executor_is_refused_saying_why(executor):
    """Nested submission to the same executor cannot work (the call runs in a
    node's process): the error says so and what to do, not pickle's lock."""

    def submit_again() -> int:
        return executor.submit(abs, -1).result()

    for send in (
        lambda: executor.submit(submit_again),
        lambda: executor.submit(id, executor),
        lambda: executor.map(id, [executor]),
    ):
        with pytest.raises(SerializationError) as info:
            send()
        assert "cannot submit to the executor running it" in str(info.value)
        assert "RLock" not in str(info.value)


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


def say_in_init(word: str) -> None:
    print(f"init {word}")
    warnings.warn(f"init {word}", stacklevel=1)


def test_what_the_initializer_prints_is_written_here_naming_its_file(local1, capsys):
    """As a ProcessPoolExecutor worker's initializer prints to the script's
    terminal: with the first call's output, its warning naming its file and line
    with the source line (on the node: ``<dynamic-code>:N``), once per worker."""
    line = say_in_init.__code__.co_firstlineno + 2
    warned = (
        f"{__file__}:{line}: UserWarning: init on\n"
        '  warnings.warn(f"init {word}", stacklevel=1)\n'
    )
    with Executor(nodes=local1, initializer=say_in_init, initargs=("on",)) as ex:
        future = ex.submit(chatty, 1)
        assert future.result(WAIT) == 1
        assert future.job.stderr == warned + "err 1\n"
        first = capsys.readouterr()
        assert (first.out, first.err) == ("init on\nout 1\n", warned + "err 1\n")
        assert list(ex.map(chatty, [2])) == [2]
        assert capsys.readouterr() == ("out 2\n", "err 2\n")


def test_dask_compute_with_the_executor_keeps_the_nodes_cpus_busy(local1):
    """``dask.compute(..., scheduler=executor)`` takes any concurrent.futures
    executor and reads ``_max_workers`` (ProcessPoolExecutor's) for how many tasks
    to keep in flight: the nodes' CPUs, not this machine's CPU count."""
    dask = pytest.importorskip("dask")
    from dask.base import get_scheduler

    with Executor(nodes=local1) as ex:
        assert get_scheduler(scheduler=ex).args == (ex.submit, 1)
        total = dask.delayed(sum)([dask.delayed(mul)(i, 2) for i in range(5)])
        assert dask.compute(total, scheduler=ex) == (20,)


def test_failing_initializer_is_a_setup_error_with_the_node_traceback(local):
    """Its traceback starts at the initializer (no frame of dispynb's), its
    frames naming this file."""
    with pytest.raises(SetupError) as info:
        Executor(nodes=local, initializer=fail_setup)
    assert "no such device" in str(info.value) + info.value.remote_traceback
    remote = info.value.remote_traceback
    assert remote.startswith("Traceback (most recent call last):\n"), remote
    assert "_initialize" not in remote, remote
    assert "in fail_setup\n" in remote, remote
    notes = "".join(info.value.__notes__)
    assert f'File "{__file__}", line ' in notes and "_initialize" not in notes, notes


@pytest.mark.parametrize("tasks", [1, 5])
def test_max_tasks_per_child_is_kept_with_a_fresh_process_per_call(local, tasks):
    """ProcessPoolExecutor code passing any bound (a leak workaround) runs: each
    job in its own process keeps it."""
    with Executor(nodes=local, max_tasks_per_child=tasks) as ex:
        pids = [f.result(WAIT) for f in [ex.submit(os.getpid) for _ in range(4)]]
    assert len(set(pids)) == 4


def test_max_tasks_per_child_is_checked_as_process_pool_executor_does(local):
    for bad, error in ((0, ValueError), (-1, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="max_tasks_per_child must be"):
            Executor(nodes=local, max_tasks_per_child=bad)


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
