"""A joblib backend: ``Parallel(n_jobs=-1)`` (and scikit-learn's ``n_jobs``) on dispynb.

joblib knows the backend under the name ``"dispynb"`` once `dispynb` is imported
(it loads this module at the backend's first use; importing this module registers
it at once)::

    import dispynb
    import joblib

    with joblib.parallel_config(backend="dispynb"):
        squares = joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(x) for x in range(100))

Without parameters it runs on a process-wide `dispynb.Executor` on local nodes (all
of this machine's CPUs), started at first use and stopped at exit or by `shutdown`;
``parallel_config(backend="dispynb", executor=my_executor)`` uses yours instead (an
`Executor` on named nodes, say), which it never shuts down. ``n_jobs=-1`` means every
CPU of the executor's nodes. joblib sends batches of calls: each batch is one job,
and joblib sizes the batches (0.2 to 1 s of work each) as it does for its own
process backends. As loky does, a batch runs with the thread pools of OpenMP,
BLAS and the like (``OMP_NUM_THREADS``, ...) limited to the nodes' CPUs divided by
``n_jobs`` (at least 1), or to ``parallel_config(inner_max_num_threads=...)``: the
CPUs are not oversubscribed. Nodes need joblib, and the libraries the calls use,
installed (`threadpoolctl`, which scikit-learn brings, for the libraries loaded
already).

`import dispynb` never imports joblib (it registers the name when joblib is
loaded); this module does.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from joblib.parallel import (
    AutoBatchingMixin,
    ParallelBackendBase,
    SequentialBackend,
    register_parallel_backend,
)

from dispynb.errors import NoNodesError
from dispynb.executor import Executor
from dispynb.futures import JobFuture
from dispynb.protocol import serialize

__all__ = ["DispynbBackend", "default_executor", "register", "shutdown"]

_default: Executor | None = None
_default_lock = threading.Lock()


def default_executor() -> Executor:
    """The executor the backend uses when given none: local nodes with all CPUs,
    started now if not running."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Executor()
            atexit.register(shutdown)
        return _default


def shutdown() -> None:
    """Stop the default executor and its local nodes (the next use starts them
    again); executors given to the backend are left alone."""
    global _default
    with _default_lock:
        executor, _default = _default, None
    if executor is not None:
        executor.shutdown(wait=True, cancel_futures=True)


def _run_batch(batch: Callable[[], Any], threads: int) -> Any:
    """Run one joblib batch of calls on a node, its thread pools limited to
    ``threads``."""
    with _thread_limits(threads):
        return batch()


@contextlib.contextmanager
def _thread_limits(threads: int) -> Iterator[None]:
    """Limit the thread pools of OpenMP, BLAS ... to ``threads`` meanwhile: the
    environment variables loky sets in its workers, for libraries loaded now, and
    threadpoolctl (if installed) for those loaded already (a worker runs many
    batches)."""
    names = [*ParallelBackendBase.MAX_NUM_THREADS_VARS]
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, str(threads)))
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            limits: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        else:
            limits = threadpool_limits(limits=threads)
        with limits:
            yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# joblib ships no type information: its base classes are Any to mypy.
class DispynbBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib's ``ParallelBackendBase`` for dispynb nodes (registered as "dispynb").

    Parameters
    ----------
    executor:
        The `dispynb.Executor` to run on; default: `default_executor`.
    wait_for_nodes:
        Seconds ``n_jobs=-1`` waits for a first node when the executor has none
        (nodes still being discovered); then `NoNodesError`.
    """

    supports_retrieve_callback = True
    supports_inner_max_num_threads = True
    default_n_jobs = -1
    MIN_IDEAL_BATCH_DURATION = 0.2
    MAX_IDEAL_BATCH_DURATION = 1.0

    def __init__(
        self,
        executor: Executor | None = None,
        wait_for_nodes: float = 10.0,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        **backend_kwargs: Any,
    ) -> None:
        super().__init__(
            nesting_level=nesting_level,
            inner_max_num_threads=inner_max_num_threads,
            **backend_kwargs,
        )
        self._executor = executor
        self._wait_for_nodes = wait_for_nodes
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._futures_lock = threading.Lock()
        self._threads = 1  # per batch: set by `configure`

    @property
    def executor(self) -> Executor:
        """The executor in use (the default one is started on first use)."""
        if self._executor is None:
            self._executor = default_executor()
        return self._executor

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """``n_jobs``, with negative numbers counted from the nodes' CPUs
        (-1: all of them)."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs < 0:
            return max(self._cpus() + 1 + n_jobs, 1)
        return n_jobs

    def _cpus(self) -> int:
        """The executor's CPUs, once it has a node."""
        executor = self.executor
        deadline = time.monotonic() + self._wait_for_nodes
        while (cpus := executor.cpus) == 0:
            if time.monotonic() >= deadline:
                raise NoNodesError(
                    f"the executor has no node after {self._wait_for_nodes:g} s, so "
                    "joblib cannot run on it: start nodes (dispynb-node) with the "
                    "client's secret, or name them (Executor(nodes=[...]))"
                )
            time.sleep(0.05)  # nodes announce themselves on the I/O thread
        return cpus

    def configure(
        self, n_jobs: int | None = 1, parallel: Any = None, **backend_kwargs: Any
    ) -> int:
        """Start a ``Parallel`` call; return how many batches may run at once."""
        self.parallel = parallel
        n_jobs = self.effective_n_jobs(n_jobs)
        # As loky's workers: the CPUs shared among the batches running at once.
        self._threads = self.inner_max_num_threads or max(
            self.executor.cpus // n_jobs, 1
        )
        return n_jobs

    def submit(
        self, func: Callable[[], Any], callback: Callable[[Any], Any] | None = None
    ) -> concurrent.futures.Future[Any]:
        """Run one batch as a job; ``callback(future)`` is called when it ends."""
        functions = [item[0] for item in getattr(func, "items", ())]
        serialize.ship_by_value(*functions)  # a script's own functions by value
        # Tracebacks show the lines of the calls' functions, as loky's do.
        future = self.executor._submit_call(
            _run_batch,
            (func, self._threads),
            {},
            (_run_batch, *functions),
            batch="joblib batch",
        )
        with self._futures_lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._futures_lock:
            self._futures.discard(future)

    def retrieve_result_callback(self, out: concurrent.futures.Future[Any]) -> Any:
        """The batch's results, or the exception one of its calls raised."""
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A call raised or ``Parallel``'s timeout passed: cancel the batches not
        started and terminate the running ones (their CPUs are free at once)."""
        with self._futures_lock:
            futures = list(self._futures)
        # One terminating cancel for all, not a cancel of the unstarted first: the
        # node answers for a batch sent ahead only when the batch before it ends,
        # so that would wait for the running batches instead of stopping them.
        jobs = [future.job for future in futures if isinstance(future, JobFuture)]
        if jobs:
            self.executor.cluster._cancel_all(jobs)

    def get_nested_backend(self) -> tuple[ParallelBackendBase, int | None]:
        """``Parallel`` inside a job runs sequentially: a job has one CPU."""
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None


def register() -> None:
    """Register the backend under the name ``"dispynb"`` (importing this module
    already did)."""
    register_parallel_backend("dispynb", DispynbBackend)


register()
