"""`Executor`: a `concurrent.futures.Executor` that runs any function on dispynb nodes.

A `JobCluster` ships one computation; an executor runs whatever function it is given.
So its cluster's computation is one generic runner, `dispynb_executor`, and each job
carries the function (pickled by value with cloudpickle, closures and all) and the
calls to make with it: one for ``submit``, ``chunksize`` for ``map``. A map's
chunk travels as columns (one sequence per argument position) and comes back as a
list of values and a dict of the calls that raised: flat lists of plain values
pickle in one pass, without a tuple and a dict per call.

- The client pickles a function once per ``submit`` and once per ``map`` (all its
  chunks share the bytes), so a function that reads a global sees its value at
  submit time, as with any pickling executor.
- Each node worker keeps the last functions it unpickled by the digest of their
  bytes: the same function (same bytes) is unpickled once per worker, not per job.
- A call that raises is caught on the node and comes back as the exception object
  itself (``except ValueError`` works around ``future.result()``), its
  ``__cause__`` a `RemoteError` holding the remote traceback. A job that failed as a
  whole (a crash, a limit, a lost node) raises `RemoteError` / `NodeLostError`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import hashlib
import inspect
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from dispynb._interruptible import Flag, HeldInterrupts, at_the_call, start_thread
from dispynb.captures import check_shippable
from dispynb.celloutput import MapOutput
from dispynb.errors import (
    ClusterError,
    DispynbError,
    NotSupportedError,
    RemoteError,
    SerializationError,
)
from dispynb.executorfailures import (
    Args,
    unpicklable_call,
)
from dispynb.executoroutcomes import (
    CallsFuture,
    call_error,
    cell_output,
    chunk_outcomes,
)
from dispynb.executorrunner import _initialize, dispynb_executor
from dispynb.futures import (
    cancel_futures as cancel_all,
)  # shutdown has an argument so named
from dispynb.job import DispyJob
from dispynb.limits import check_mem_limit
from dispynb.protocol import serialize

if TYPE_CHECKING:
    from dispynb.backends.base import Engine
    from dispynb.cluster import ClusterFactory
    from dispynb.local import LocalCluster
    from dispynb.objects import ObjectRef

__all__ = ["Executor", "dispynb_executor"]


class Executor(concurrent.futures.Executor):
    """Run functions on dispynb nodes as a `concurrent.futures.Executor`.

    Parameters
    ----------
    max_workers:
        With ``nodes=None``: the CPUs of the `LocalCluster` the executor starts
        (default: this machine's). Otherwise unused (the nodes' CPUs count).
    nodes:
        ``None``: start a `LocalCluster` (closed by `shutdown`), unless ``engine``
        is given; a `LocalCluster` you started; or node specs, as `JobCluster`'s
        ``nodes`` (``'host'``, ``'host:port'``, ``'*'`` ...).
    engine:
        What runs the calls, as `JobCluster`'s ``engine`` (None: dispynb's node
        servers; a Dask or Ray engine: its cluster's workers).
    cluster_factory:
        Makes the executor's cluster (`dispynb.cluster.ClusterFactory`); default
        `dispynb.cluster.new_cluster`.
    initializer, initargs:
        As `concurrent.futures.ProcessPoolExecutor`'s: ``initializer(*initargs)``
        runs once per node before any call (as `JobCluster`'s ``setup``; the
        worker processes fork after it, so what it sets in the process, such as
        environment variables or a seed, they inherit; the calls see the
        globals it sets, as a pool's worker's calls do). What it prints or
        warns is written here with the output of each worker's first call. If
        it raises, creating the executor raises `SetupError` with the node's
        traceback.
    max_tasks_per_child:
        Any value (``N >= 1``) runs each job in a fresh process
        (``fresh_process=True``: at most N calls per process, as asked; a
        ``map`` job's ``chunksize`` calls count as one, as in
        `ProcessPoolExecutor`); None (default) reuses worker processes.
    **options:
        `JobCluster` options: ``secret``, ``secret_file``, ``cafile``,
        ``job_timeout``, ``mem_limit``, ``depends``, ``setup`` ...

    Examples
    --------
    >>> with Executor(max_workers=2) as executor:  # doctest: +SKIP
    ...     print(list(executor.map(pow, [2, 3], [5, 2])))
    [32, 9]
    """

    def __init__(
        self,
        max_workers: int | None = None,
        nodes: Any = None,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
        engine: Engine | None = None,
        cluster_factory: ClusterFactory | None = None,
        **options: Any,
    ) -> None:
        from dispynb.cluster import new_cluster
        from dispynb.local import LocalCluster

        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        _check_options(options, cluster_factory)
        if max_tasks_per_child is not None:
            # As ProcessPoolExecutor checks it. Workers cannot count jobs, so any
            # bound is kept as 1: a fresh process per job (at most N, as asked).
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
            options["fresh_process"] = True
        if initializer is not None:
            if not callable(initializer):
                raise TypeError("initializer must be a callable")
            if "setup" in options:
                raise ValueError("give initializer or setup, not both")
            serialize.ship_by_value(initializer)  # a script's own: by value
            options["setup"] = functools.partial(_initialize, initializer, initargs)
        # dispy's default recovery file (_dispy_*) is for dispy programs.
        options.setdefault("recover_file", False)
        make = cluster_factory or new_cluster
        # Checked by the cluster: for the advice on a call's MemoryError.
        self._mem_limit = check_mem_limit(options.get("mem_limit"), "mem_limit")
        # Held across each job's submission, so that shutdown sees every job
        # submitted before it and none after. The jobs not done are the cluster's
        # (`_live_jobs`): the executor keeps no list of its own, so a ``map``
        # dropped unread (its calls run, as in the standard library) holds
        # nothing once its jobs end.
        self._lock = threading.RLock()
        self._shut = False
        self._terminate = False  # on close, terminate running jobs (an interrupt)
        self._closed = Flag()  # set once closed (a Flag: users may wait on it)
        self._background = False  # shutdown(wait=False) started a closing thread
        self._closing = threading.Lock()  # held by the thread closing
        self._local: LocalCluster | None = None
        self._initializer = initializer  # its output's lines are mapped back too
        # Large functions (a closure over an array) put once, by digest: see
        # `_carrier`. None: the engine cannot put (Dask, Ray).
        self._put: dict[str, ObjectRef] | None = {}
        self._put_bytes = 0  # of them: `PUT_BUDGET` at most
        self._large_seen: set[str] = set()
        # Nothing after the nodes start but in this try: a Ctrl-C landing there
        # must not leave them running, out of the user's reach.
        try:
            if nodes is None and engine is None:
                # Its nodes send results as large as the client takes.
                nodes = self._local = LocalCluster(
                    cpus=max_workers or os.cpu_count() or 1,
                    max_message_size=options.get("max_message_size"),
                )
            self.cluster = make(dispynb_executor, nodes=nodes, engine=engine, **options)
            # Never shut down: its pending calls end with the script (documented).
            self.cluster.terminate_at_exit = True
            # The calls' exceptions are unpickled as the cluster's results are.
            types = getattr(
                getattr(self.cluster, "_options", None), "result_types", None
            )
            self._allowed = None if types is None else serialize.AllowList(types)
            # Dropped unshut, as a ProcessPoolExecutor garbage collected: its calls
            # end, then its cluster and own nodes close (at exit: terminated).
            weakref.finalize(
                self, _close_dropped, self.cluster, self._local, self._closed
            ).atexit = False
        except BaseException:
            if self._local is not None:
                self._local.close()
            raise

    @property
    def cpus(self) -> int:
        """CPUs of the nodes in use now (what ``n_jobs=-1`` means to joblib)."""
        return sum(node.cpus for node in self.cluster.status().nodes)

    @property
    def _max_workers(self) -> int:
        """The nodes' CPUs now (at least 1), where `ProcessPoolExecutor` keeps its
        ``max_workers``: Dask's ``compute(scheduler=executor)`` reads it for the
        tasks it keeps in flight (else this machine's CPU count)."""
        return max(self.cpus, 1)

    # -- submitting ------------------------------------------------------------------

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a node; return its future (a `JobFuture`:
        ``future.job`` is the `DispyJob`, with the job's output and node). An
        ``async def`` function's coroutine runs there to its end (``asyncio.run``)."""
        return self._submit_call(fn, args, kwargs, (fn,))

    def _submit_call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        sources: tuple[Any, ...],
        batch: str = "",
    ) -> CallsFuture:
        """`submit`; the call's traceback shows the code of ``sources`` (the
        functions it runs) by file and line. ``batch`` names what the call is
        when it runs others and returns their values in a list (``"joblib
        batch"``): a value that cannot be sent back is named by its place there."""
        key, blob = _pickle(fn)
        sources = (*sources, self._initializer)  # the lines of its warnings too
        blob = self._carrier(key, blob, reused=False)
        try:
            with self._lock:
                job = self._new_job(key, blob, [args], kwargs)
            future = job._attach(
                lambda job: CallsFuture(
                    job, sources, self._mem_limit, self._allowed, batch
                )
            )
            assert isinstance(future, CallsFuture)
        except KeyboardInterrupt as interrupted:
            # Landing as the cluster's submit returned or the future was made,
            # the caller never gets the future to cancel: the call must not run.
            self._stop_interrupted((), blob)
            at_the_call(interrupted)  # at the user's line
            raise
        return future

    def _carrier(self, key: str, blob: bytes, *, reused: bool) -> Any:
        """What the jobs of one `submit` or ``map`` carry for their function: its
        ``blob``, or, for one of at least `PUT_BYTES` that calls use again (a
        ``map``'s chunks, a second `submit`), a tuple of its `ObjectRef`'s digest
        and the ref (the node's worker unloads it after each job):
        put once, each node receives it once, where each job carried all its
        bytes (a lambda closing over a large array sent it with every call). A
        new object per call, by which `_unfinished` tells the call's jobs.

        What is put stays (a file here and on each node) until the executor
        closes: `PUT_BUDGET` bytes of it at most, the functions after that
        travel with their jobs (a loop mapping another large closure each time
        filled the disks, /tmp often in RAM, by its size at each map)."""
        if len(blob) < PUT_BYTES or self._put is None:
            return blob
        with self._lock:
            ref = self._put.get(key)
            if ref is None:
                if not reused and key not in self._large_seen:
                    self._large_seen.add(key)  # once is no reuse: no file for it
                    return blob
                if self._put_bytes + len(blob) > PUT_BUDGET:
                    return blob
                try:
                    ref = self._put[key] = self.cluster.put(blob)
                except (NotSupportedError, AttributeError):
                    self._put = None  # not on this engine (or cluster): as before
                    return blob
                except ClusterError:  # no room for its file: with each job
                    return blob
                self._put_bytes += len(blob)
        return (ref.digest, ref)

    def _new_job(
        self,
        key: str,
        blob: Any,
        calls: list[Args],
        kwargs: dict[str, Any] | None = None,
    ) -> DispyJob:
        """Submit a job making ``calls`` (each with ``kwargs``); the caller holds
        `_lock`."""
        if self._shut:
            raise RuntimeError("cannot schedule new futures after shutdown")
        columns = tuple(zip(*calls, strict=True))
        try:
            return self.cluster.submit(key, blob, len(calls), columns, kwargs or None)
        except SerializationError as exc:
            # Its message names the runner's arguments (the columns of calls).
            message = unpicklable_call(calls, kwargs or {}, exc)
            raise SerializationError(message) from None

    def _submit_chunk(self, key: str, blob: Any, calls: list[Args]) -> DispyJob:
        """Submit a job of a ``map``: no future (one per job would cost the I/O
        thread a third of its time per job, W8), the job itself is waited for."""
        with self._lock:
            return self._new_job(key, blob, calls)

    def _live_jobs(self) -> list[DispyJob]:
        """The jobs submitted and not done (of ``submit`` and ``map`` alike)."""
        return [job for job in list(self.cluster._jobs.values()) if not job.done()]

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """``map(fn, *iterables)`` on the nodes, ``chunksize`` calls per job.

        Results come in the order of the inputs; a call that raised raises when its
        value is reached, and ``TimeoutError`` if a value is not there ``timeout``
        seconds after this call. Leaving the iteration early (``break``, an
        exception, closing the iterator) cancels the jobs not yet started; a map
        never iterated runs all its calls, as in the standard library
        (``executor.map(save, items)`` for the calls' effects). ``buffersize`` (as
        in Python 3.14) reads the inputs lazily, so they may be endless: that
        many chunks are submitted, and one more each time a value is asked for.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0.")
        end = None if timeout is None else time.monotonic() + timeout
        key, blob = _pickle(fn)
        blob = self._carrier(key, blob, reused=True)
        chunks = _chunks(zip(*iterables, strict=False), chunksize)
        in_flight = itertools.islice(chunks, buffersize) if buffersize else chunks
        jobs: collections.deque[DispyJob] = collections.deque()
        try:
            for chunk in in_flight:
                jobs.append(self._submit_chunk(key, blob, chunk))
            output = cell_output(jobs, (fn, self._initializer))
        except KeyboardInterrupt as interrupted:
            self._stop_interrupted(jobs, blob)
            at_the_call(interrupted)  # at the user's line
            raise
        except BaseException:  # an argument that cannot be pickled, say
            self._cancel_chunks(self._unfinished(jobs, blob))  # no orphans left
            raise
        more = chunks if buffersize else iter(())
        # A generator not started runs no ``finally`` when it is closed or
        # dropped: the calls of a map never iterated all run (as the standard
        # library's), those of a map left after its first value are cancelled.
        return self._results(jobs, more, fn, key, blob, end, output)

    def _results(
        self,
        jobs: collections.deque[DispyJob],
        more: Iterator[list[Args]],
        fn: Callable[..., Any],
        key: str,
        blob: Any,
        end: float | None,
        output: MapOutput | None = None,
    ) -> Iterator[Any]:
        sources = (fn, self._initializer)
        try:
            while jobs:
                # As Python 3.14's: the next input goes before the wait, so that
                # buffersize calls run while a value is awaited, the next queued.
                for chunk in itertools.islice(more, 1):
                    jobs.append(self._submit_chunk(key, blob, chunk))
                wait = None if end is None else max(end - time.monotonic(), 0.0)
                values, failures = chunk_outcomes(jobs[0], wait, sources, output)
                jobs.popleft()
                if not failures:
                    yield from values
                    continue
                for index, value in enumerate(values):
                    failure = failures.get(index)
                    if failure is not None:
                        raise call_error(
                            failure, sources, self._mem_limit, self._allowed
                        )
                    yield value
        except KeyboardInterrupt as interrupted:
            if isinstance(interrupted.__cause__, RemoteError):  # a call's own
                raise
            self._stop_interrupted(jobs, blob)
            at_the_call(interrupted)  # at the user's line
            raise
        finally:
            self._cancel_chunks(jobs)

    def _stop_interrupted(self, jobs: Iterable[DispyJob], blob: Any) -> None:
        """Stop the jobs of a ``map`` or `submit` interrupted (Ctrl-C, the
        notebook's Stop) as it submits or waits (``jobs``, and the one whose
        submit it cut short: `_unfinished`): the queued ones are cancelled and
        the running ones terminated, as %%dispy and `Run.map` stop theirs (a
        terminal's Ctrl-C reaches a ProcessPoolExecutor's processes too, in its
        process group; never the nodes). The caller then raises the interrupt,
        its traceback ending at the user's line."""
        with HeldInterrupts():  # a second press must not cut this short
            self.cluster._cancel_all(self._unfinished(jobs, blob))

    def _unfinished(self, jobs: Iterable[DispyJob], blob: Any) -> list[DispyJob]:
        """The jobs of a ``map`` or `submit` not done: ``jobs``, and any other job
        of its function's ``blob`` (its own bytes, or `_carrier`'s tuple: new for
        each map and `submit`). An interrupt landing as the cluster's submit
        returned leaves the cluster with a job the caller never got: found that
        way, it is stopped too."""
        own = [job for job in jobs if not job.done()]
        ids = {id(job) for job in own}
        stray = [
            job
            for job in self._live_jobs()
            if id(job) not in ids and len(job._args) > 1 and job._args[1] is blob
        ]
        return own + stray

    def _cancel_chunks(self, jobs: Iterable[DispyJob]) -> None:
        """Cancel the jobs of a ``map`` left early (a timeout, a ``break``, an
        error), without waiting for the nodes' answers (a job sent ahead to a
        worker whose job has just ended is answered for only by that worker):
        leaving must not wait on the calls still running."""
        cancel_all([job.future for job in jobs if not job.done()], wait=False)

    # -- shutting down ---------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more work; then close the cluster (and the executor's own local
        nodes) once the jobs submitted are done.

        ``cancel_futures`` cancels the jobs not yet started; ``wait=False``
        returns at once and closes in the background. An interrupt (Ctrl-C, the
        notebook's Stop) while it waits cancels the jobs not started and
        terminates the running ones, then is raised, as one inside
        ``with Executor() as ...`` does.
        """
        with self._lock:
            self._shut = True
            background = not wait and not self._background
            self._background = self._background or background
        if cancel_futures:
            # Not waiting for the nodes' answers (a job sent ahead may be answered
            # for only by its worker): closing waits for every job anyway.
            cancel_all([job.future for job in self._live_jobs()], wait=False)
        if background:
            closer = threading.Thread(
                target=self._close, name="dispynb-executor-shutdown"
            )
            try:
                start_thread(closer)
            except RuntimeError:  # no thread: Python 3.12.0-1 once the main ended
                self._close()  # here, as Python would wait for that thread at exit
        elif wait:
            self._close()

    def _close(self) -> None:
        """Close the cluster once its jobs are done, then the executor's own local
        nodes (idempotent; one thread at a time). An interrupt while it waits
        stops the jobs instead (the queued cancelled, the running terminated),
        then is raised."""
        try:
            # A lock's own ``with`` (C code): an interrupt cannot leave it held.
            with self._closing:
                if self._closed.is_set():
                    return
                try:
                    self.cluster.close(terminate=self._terminate)
                except BaseException:
                    self._cancel_unstarted()
                    self.cluster.close(terminate=True)
                    raise
                finally:
                    if self._local is not None:
                        self._local.close()
                    self._closed.set()
        except BaseException:
            if not self._closed.is_set():  # waiting for a close in the background
                self._cancel_unstarted()
                with contextlib.suppress(DispynbError, RuntimeError):  # closed now
                    self.cluster._cancel_all(self._live_jobs())  # terminates them
            raise

    def _cancel_unstarted(self) -> None:
        """Cancel the jobs not started, before the running ones are terminated: a
        worker whose running job is then terminated skips those sent ahead to
        it instead of starting one before its cancel arrives."""
        self._terminate = True
        cancel_all([job.future for job in self._live_jobs()], wait=False)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Shut down, waiting for the jobs; an interrupt (Ctrl-C, the notebook's
        Stop) cancels the jobs not started and terminates the running ones instead
        of waiting for them (as `JobCluster` does). ``sys.exit()`` waits, as does
        a call's own KeyboardInterrupt or SystemExit (``result()`` raised it), as
        in `ProcessPoolExecutor`."""
        interrupted = (
            exc is not None
            and not isinstance(exc, (Exception, SystemExit))
            and not isinstance(exc.__cause__, RemoteError)  # a call's own
        )
        self._terminate = self._terminate or interrupted
        # The cancels of the jobs not started reach the nodes before the terminating
        # close: a worker whose running job is interrupted then skips those sent
        # ahead to it instead of starting one before its cancel arrives.
        self.shutdown(wait=True, cancel_futures=interrupted)

    def __reduce__(self) -> Any:
        """An executor captured by a call, or given to one, is refused saying why
        (pickle's own error names a lock)."""
        raise TypeError(
            "a dispynb.Executor cannot be sent to its nodes: a call runs in a "
            "node's process and cannot submit to the executor running it; submit "
            "the next calls here, from the results (as_completed), or create an "
            "Executor inside the call (it starts its own nodes there)"
        )

    def __repr__(self) -> str:
        state = "shut down" if self._shut else f"pending={len(self._live_jobs())}"
        return f"<dispynb.Executor nodes={len(self.cluster.status().nodes)} {state}>"


def _close_dropped(cluster: Any, local: LocalCluster | None, closed: Flag) -> None:
    """Close the cluster of an executor dropped without `shutdown`, once its jobs
    are done, then its own local nodes: in a thread, as the collection that
    dropped it may run on any thread (the I/O thread's included)."""
    if closed.is_set():
        return

    def close() -> None:
        try:
            cluster.close()
        finally:
            if local is not None:
                local.close()
            closed.set()

    # Where no thread can start (Python 3.12.0 and 3.12.1 once the main thread has
    # ended), the exit functions close the cluster, terminating its calls as for
    # an executor left open, and the local nodes.
    with contextlib.suppress(RuntimeError):
        start_thread(threading.Thread(target=close, name="dispynb-executor-dropped"))


def _check_options(options: dict[str, Any], factory: Any) -> None:
    """Raise `TypeError` for a keyword that is neither the executor's nor a
    `JobCluster` option (another ``cluster_factory`` may take others), before
    any local node starts."""
    from dispynb.options import ClusterOptions

    if "mp_context" in options:
        raise TypeError(
            "Executor() takes no mp_context (ProcessPoolExecutor's): the calls run "
            "in worker processes the nodes start, never forked from this one, so "
            "each call's function and arguments are sent (as with 'spawn'); drop "
            "the argument"
        )
    if factory is None:
        own = inspect.signature(Executor).parameters
        ClusterOptions.check_keywords(options, "Executor", own)


#: A pickled function this large (a closure over an array, say) goes to the nodes
#: once when calls reuse it, not with each job (`Executor._carrier`).
PUT_BYTES = 1 << 20
#: Bytes of such functions an executor puts at most (they stay until it closes).
PUT_BUDGET = 256 << 20


def _pickle(fn: Callable[..., Any]) -> tuple[str, bytes]:
    """``fn`` pickled by value, and the digest nodes cache it by; a function
    that cannot be is a `SerializationError` naming what it captures that cannot
    (pickle's own message names only a type). One not callable is sent too:
    as in ProcessPoolExecutor, calling it raises, from ``result()``."""
    serialize.ship_by_value(fn)
    try:
        blob = serialize.dumps_in_band(fn)
    except Exception:
        check_shippable(fn, "function")
        raise
    return hashlib.blake2b(blob, digest_size=16).hexdigest(), blob


def _chunks(items: Iterator[Args], size: int) -> Iterator[list[Args]]:
    """Lists of up to ``size`` calls, read lazily from ``items``."""
    while True:
        chunk = list(itertools.islice(items, size))
        if not chunk:
            return
        yield chunk
