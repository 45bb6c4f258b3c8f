"""Benchmark backends: one adapter per system under test, behind a small protocol.

Contents
--------
Backend
    The protocol every backend implements (``start``, ``submit_and_wait``,
    ``round_trip``, ``close``).
BenchmarkError
    A backend returned a wrong result or a job failed.
DispynbBackend
    One `dispynb.LocalCluster` node with W CPUs and a `dispynb.JobCluster`.
ProcessPoolBackend
    `concurrent.futures.ProcessPoolExecutor` with W workers.
BACKENDS
    Registry: backend name -> constructor taking the number of workers.

Adding a peer (dispy, ipyparallel, Dask, Ray) means writing one class with the four
methods of `Backend` (plus ``describe``) and registering it in `BACKENDS`; the workloads
and the report need no change.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Protocol

__all__ = [
    "BACKENDS",
    "Backend",
    "BenchmarkError",
    "DispynbBackend",
    "ProcessPoolBackend",
]

#: A task function as shipped to the workers (``inc``, ``size`` in ``run.py``).
Task = Callable[..., Any]


class BenchmarkError(RuntimeError):
    """A job failed or returned a wrong result; the numbers would be meaningless."""


class Backend(Protocol):
    """A system under test, seen by the workloads.

    A backend is created with the number of worker processes W, started once outside
    any timed region, then used by every selected workload, then closed.

    Attributes
    ----------
    name:
        Short key used on the command line and in the JSON (``"dispynb"``, ``"ppe"``).
    label:
        Column header in the printed table.
    """

    name: str
    label: str

    def start(self) -> None:
        """Create the workers; may take seconds and is never timed."""

    def submit_and_wait(
        self, fn: Task, arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        """Submit ``fn(*args)`` for every tuple, as fast as possible; return the results
        in submission order once all are back."""

    def round_trip(self, fn: Task, arg: Any) -> Any:
        """Submit one ``fn(arg)``, wait for it and return its result."""

    def close(self) -> None:
        """Stop the workers; idempotent."""

    def describe(self) -> dict[str, Any]:
        """Configuration details recorded in the JSON results."""


class ProcessPoolBackend:
    """`concurrent.futures.ProcessPoolExecutor` with the default start method.

    On Linux with Python 3.11 to 3.13 the default is ``fork`` (3.14 switches to
    ``forkserver``); the method actually used is recorded by `describe`. Every job is
    an individual ``submit`` (no ``map`` chunking), as with dispynb.
    """

    name = "ppe"
    label = "ProcessPoolExecutor"

    def __init__(self, workers: int) -> None:
        self.workers: int = workers
        self.start_method: str = multiprocessing.get_start_method()
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        context = multiprocessing.get_context(self.start_method)
        self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)

    def submit_and_wait(
        self, fn: Task, arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        pool = self._require_pool()
        futures = [pool.submit(fn, *args) for args in arglists]
        return [future.result() for future in futures]

    def round_trip(self, fn: Task, arg: Any) -> Any:
        return self._require_pool().submit(fn, arg).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def describe(self) -> dict[str, Any]:
        return {
            "class": "concurrent.futures.ProcessPoolExecutor",
            "max_workers": self.workers,
            "start_method": self.start_method,
        }

    def _require_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            raise RuntimeError("ProcessPoolBackend.start() was not called")
        return self._pool


class DispynbBackend:
    """dispynb: one `LocalCluster` node with W CPUs on 127.0.0.1.

    dispy's model is one computation per `JobCluster`, so a cluster is created for each
    task function the first time it is used (during a workload's warm-up, hence never
    timed) and closed when the next function is needed. The node servers live for the
    whole run.
    """

    name = "dispynb"
    label = "dispynb"

    def __init__(self, workers: int) -> None:
        self.workers: int = workers
        self._stack = contextlib.ExitStack()
        self._cluster_stack = contextlib.ExitStack()
        self._local: Any = None
        self._cluster: Any = None
        self._fn: Task | None = None

    def start(self) -> None:
        # Imported here so that the other backends run even while dispynb is broken.
        from dispynb import LocalCluster

        self._local = self._stack.enter_context(
            LocalCluster(nodes=1, cpus=self.workers)
        )

    def submit_and_wait(
        self, fn: Task, arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        cluster = self._cluster_for(fn)
        jobs = [cluster.submit(*args) for args in arglists]
        return [self._result(job) for job in jobs]

    def round_trip(self, fn: Task, arg: Any) -> Any:
        return self._result(self._cluster_for(fn).submit(arg))

    def close(self) -> None:
        self._cluster_stack.close()
        self._cluster = self._fn = None
        self._stack.close()
        self._local = None

    def describe(self) -> dict[str, Any]:
        import dispynb

        return {
            "class": "dispynb.JobCluster on dispynb.LocalCluster",
            "nodes": 1,
            "cpus": self.workers,
            "version": dispynb.__version__,
        }

    def _cluster_for(self, fn: Task) -> Any:
        """Return the `JobCluster` running ``fn``, replacing the previous one."""
        if self._fn is fn:
            return self._cluster
        if self._local is None:
            raise RuntimeError("DispynbBackend.start() was not called")
        from dispynb import JobCluster

        self._cluster_stack.close()
        self._cluster = self._cluster_stack.enter_context(
            JobCluster(fn, nodes=self._local)
        )
        self._fn = fn
        return self._cluster

    @staticmethod
    def _result(job: Any) -> Any:
        """Wait for ``job``; raise `BenchmarkError` unless it finished normally."""
        from dispynb import DispyJob

        result = job()
        if job.status != DispyJob.Finished:
            status = getattr(job.status, "name", job.status)
            raise BenchmarkError(
                f"dispynb job {job.id} ended with status {status} instead of"
                f" Finished:\n{job.exception or '(no traceback)'}"
            )
        return result


#: Backend name -> constructor taking the number of workers. Order is the column order.
BACKENDS: dict[str, Callable[[int], Backend]] = {
    DispynbBackend.name: DispynbBackend,
    ProcessPoolBackend.name: ProcessPoolBackend,
}
