"""Benchmark backends: the protocol, the registry and the two in-process backends.

Contents
--------
Backend
    The protocol every backend implements (``start``, ``submit_and_wait``,
    ``round_trip``, ``close``, ``describe``).
BenchmarkError
    A backend returned a wrong result or a job failed.
BackendSpec, BACKENDS
    Registry: backend name -> label, the environment whose interpreter runs it and the
    class implementing it (``"module:Class"``, imported only by the driver).
DispynbBackend
    One `dispynb.LocalCluster` node with W CPUs and a `dispynb.JobCluster`.
DispynbSocketBackend
    The same with shared memory turned off: large arguments over the socket (the
    before/after comparison of issue 17 in one run).
ProcessPoolBackend
    `concurrent.futures.ProcessPoolExecutor` with W workers.

Every backend runs in its own driver process (``driver.py``): dispynb and
ProcessPoolExecutor with the project's interpreter, the peers (``peers/*.py``) with
the interpreter of their private environment (``venvs.py``). This module is imported
by both sides, so it must only import the standard library at module level.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "BACKENDS",
    "PEERS",
    "Backend",
    "BackendSpec",
    "BenchmarkError",
    "DispynbBackend",
    "DispynbSocketBackend",
    "ProcessPoolBackend",
    "Unsupported",
    "load_backend",
]

#: A task function as shipped to the workers (``inc``, ``size`` in ``driver.py``).
Task = Callable[..., Any]


class BenchmarkError(RuntimeError):
    """A job failed or returned a wrong result; the numbers would be meaningless."""


class Unsupported(BenchmarkError):
    """The backend refuses what the workload needs (dispynb on an engine that lacks
    a feature): the workload is left out for it, not reported as a failure."""


class Backend(Protocol):
    """A system under test, seen by the workloads.

    A backend is created with the number of worker processes W, started once (timed
    only by the start-up workload), used by every selected workload, then closed.
    It may set ``release_wait``: seconds W4 waits, untimed, before each repetition
    (`workloads.Bandwidth`; the Ray rows, whose engine frees arguments
    asynchronously). A backend that is a ``concurrent.futures`` executor has
    ``map_calls(fn, inputs)``: ``list(executor.map(fn, inputs))`` (W8,
    `workloads.ExecutorMap`); the others lack it, or set it to None. One that
    journals jobs for recovery has ``journal_round(fn, arglists, journaled)`` (W9,
    `workloads.RecoverFile`): dispynb's node servers only.
    """

    name: str

    def start(self) -> None:
        """Create the client, the nodes or workers; blocks until they can take jobs."""

    def submit_and_wait(
        self, fn: Task, arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        """Submit ``fn(*args)`` for every tuple, each as its own job, as fast as
        possible; return the results in submission order once all are back."""

    def round_trip(self, fn: Task, arg: Any) -> Any:
        """Submit one ``fn(arg)``, wait for it and return its result."""

    def close(self) -> None:
        """Stop everything `start` started; idempotent."""

    def describe(self) -> dict[str, Any]:
        """Version and configuration details recorded in the JSON results."""


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """How to run one backend.

    Attributes
    ----------
    name:
        Key on the command line and in the JSON.
    label:
        Column header in the tables.
    venv:
        Name of its private environment (`venvs.REQUIREMENTS`), or ``None`` for the
        project's interpreter.
    factory:
        ``"module:Class"`` of the implementation, relative to ``bench/``.
    peer:
        Whether it counts as a distributed peer for issue 7's "best peer" targets
        (ProcessPoolExecutor and loky are the single-machine floor instead).
    """

    name: str
    label: str
    venv: str | None
    factory: str
    peer: bool


#: Registry in column order: dispynb, the distributed peers, the single-machine floor.
BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("dispynb", "dispynb", None, "backends:DispynbBackend", False),
        BackendSpec(
            "dispynb-socket",
            "dispynb (no shm)",
            None,
            "backends:DispynbSocketBackend",
            False,
        ),
        BackendSpec(
            "dispynb-scheduler",
            "dispynb via scheduler",
            None,
            "sched_backend:DispynbSchedulerBackend",
            False,
        ),
        BackendSpec(
            "dispy", "dispy", "dispy", "peers.dispy_backend:DispyBackend", True
        ),
        BackendSpec(
            "ipyparallel",
            "ipyparallel",
            "ipyparallel",
            "peers.ipp_backend:IpyparallelBackend",
            True,
        ),
        BackendSpec("dask", "Dask", "dask", "peers.dask_backend:DaskBackend", True),
        BackendSpec(
            "dispynb-dask",
            "dispynb on Dask",
            None,
            "engines:DispynbDaskBackend",
            False,
        ),
        BackendSpec("ray", "Ray", "ray", "peers.ray_backend:RayBackend", True),
        BackendSpec(
            "dispynb-ray",
            "dispynb on Ray",
            None,
            "engine_ray:DispynbRayBackend",
            False,
        ),
        BackendSpec("loky", "loky", "loky", "peers.loky_backend:LokyBackend", False),
        BackendSpec(
            "ppe", "ProcessPoolExecutor", None, "backends:ProcessPoolBackend", False
        ),
    )
}

#: The distributed peers dispynb is compared with for issue 7's targets.
PEERS: tuple[str, ...] = tuple(name for name, spec in BACKENDS.items() if spec.peer)


def load_backend(name: str, workers: int) -> Backend:
    """Import and instantiate backend ``name`` (in the driver process)."""
    module_name, _, class_name = BACKENDS[name].factory.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    backend: Backend = cls(workers)
    return backend


class ProcessPoolBackend:
    """`concurrent.futures.ProcessPoolExecutor` with the default start method.

    On Linux with Python 3.11 to 3.13 the default is ``fork`` (3.14 switches to
    ``forkserver``); the method actually used is recorded by `describe`. Every job is
    an individual ``submit`` (no ``map`` chunking), as with dispynb.
    """

    name = "ppe"

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

    def map_calls(self, fn: Task, inputs: Iterable[Any]) -> list[Any]:
        """W8: the pool's own ``map`` (default ``chunksize``, 1)."""
        return list(self._require_pool().map(fn, inputs))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def describe(self) -> dict[str, Any]:
        import platform

        return {
            "version": f"Python {platform.python_version()}",
            "config": f"max_workers={self.workers}, start method {self.start_method!r}",
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

    def __init__(self, workers: int) -> None:
        self.workers: int = workers
        #: Local nodes to start; the workers are spread over them (W7: 4 nodes).
        self.nodes: int = 1
        self._stack = contextlib.ExitStack()
        self._cluster_stack = contextlib.ExitStack()
        self._local: Any = None
        self._cluster: Any = None
        self._fn: Task | None = None
        self._executor: Any = None
        # Imported before the start-up clock starts, as every peer's package is:
        # a program's ``from dispynb import JobCluster`` loads these (``import
        # dispynb`` alone loads them only when a name is first used).
        from dispynb import JobCluster, LocalCluster  # noqa: F401

    def start(self) -> None:
        from dispynb import LocalCluster

        self._local = self._stack.enter_context(
            LocalCluster(nodes=self.nodes, cpus=max(1, self.workers // self.nodes))
        )

    def submit_and_wait(
        self, fn: Task, arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        cluster = self._cluster_for(fn)
        jobs = [cluster.submit(*args) for args in arglists]
        return [self._result(job) for job in jobs]

    def round_trip(self, fn: Task, arg: Any) -> Any:
        return self._result(self._cluster_for(fn).submit(arg))

    def map_calls(self, fn: Task, inputs: Iterable[Any]) -> list[Any]:
        """W8: ``list(Executor(nodes=local).map(fn, inputs))``, default ``chunksize``
        (1); one `dispynb.Executor` on the same node for the whole run, made on
        first use (the warm-up), after closing the `JobCluster` of W1-W4."""
        if self._executor is None:
            from dispynb import Executor

            self._cluster_stack.close()
            self._cluster = self._fn = None
            self._executor = self._stack.enter_context(
                Executor(**self._cluster_options())
            )
        return list(self._executor.map(fn, inputs))

    def journal_round(
        self, fn: Task, arglists: Sequence[tuple[Any, ...]], journaled: bool
    ) -> tuple[float, list[Any]]:
        """W9: ``(seconds, results)`` of the jobs submitted at once and waited for,
        on a new `JobCluster` of ``fn`` on the run's nodes, with ``recover_file``
        (a new file in a temporary directory) if ``journaled``. Made, warmed up
        with 20 jobs and closed untimed, after closing the cluster of W1-W4."""
        from dispynb import JobCluster

        self._cluster_stack.close()
        self._cluster = self._fn = None
        with contextlib.ExitStack() as stack:
            options = self._cluster_options()
            if journaled:
                folder = stack.enter_context(tempfile.TemporaryDirectory())
                options["recover_file"] = os.path.join(folder, "recover.db")
            cluster = stack.enter_context(JobCluster(fn, **options))
            for job in [cluster.submit(*arglists[0]) for _ in range(20)]:
                self._result(job)
            start = time.perf_counter()
            jobs = [cluster.submit(*args) for args in arglists]
            results = [self._result(job) for job in jobs]
            return time.perf_counter() - start, results

    def share(self, fn: Task, obj: Any) -> Any:
        """W7: ``JobCluster.put``; jobs get the handle. `Unsupported` where the
        engine refuses ``put`` (Dask's and Ray's lack ``job_depends``)."""
        from dispynb.errors import NotSupportedError

        try:
            return self._cluster_for(fn).put(obj)
        except NotSupportedError as exc:
            raise Unsupported(str(exc)) from exc

    def close(self) -> None:
        self._cluster_stack.close()
        self._cluster = self._fn = None
        self._stack.close()
        self._local = self._executor = None

    def describe(self) -> dict[str, Any]:
        import dispynb

        return {
            "version": dispynb.__version__,
            "config": f"LocalCluster(nodes={self.nodes},"
            f" cpus={max(1, self.workers // self.nodes)}) on 127.0.0.1,"
            " one JobCluster per function",
        }

    def _cluster_options(self) -> dict[str, Any]:
        """What each `JobCluster` gets besides the function (where it runs)."""
        if self._local is None:
            raise RuntimeError(f"{type(self).__name__}.start() was not called")
        return {"nodes": self._local}

    def _cluster_for(self, fn: Task) -> Any:
        """Return the `JobCluster` running ``fn``, replacing the previous one."""
        if self._fn is fn:
            return self._cluster
        from dispynb import JobCluster

        self._cluster_stack.close()
        self._cluster = self._fn = None
        self._cluster = self._cluster_stack.enter_context(
            JobCluster(fn, **self._cluster_options())
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


class DispynbSocketBackend(DispynbBackend):
    """dispynb with ``DISPYNB_SHARED_MEMORY=0``: every argument over the socket."""

    name = "dispynb-socket"
    map_calls = None  # W8 has no large arguments: the dispynb row's
    journal_round = None  # nor W9

    def __init__(self, workers: int) -> None:
        import os

        os.environ["DISPYNB_SHARED_MEMORY"] = "0"
        super().__init__(workers)

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["config"] += "; DISPYNB_SHARED_MEMORY=0 (socket only)"
        return described
