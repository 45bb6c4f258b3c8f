"""The repeated benchmark workloads (W1-W4) and what they measure; backend-agnostic.

Contents
--------
Metric
    One reported number: unit, direction.
Workload
    The protocol of a workload: ``warm_up`` then repeated ``measure``.
Throughput, Latency, CpuBound, Bandwidth
    W1 to W4 of issue 7 (``Bandwidth.measure_cold``: W4 cold, issue 17).
ExecutorMap
    W8: ``Executor.map`` of many small calls, for the backends that are a
    ``concurrent.futures`` executor (dispynb's `Executor`, ProcessPoolExecutor). W5
    (start-up), W6 (closures) and memory are measured by
    ``driver.py`` because they need fresh backends or process inspection.
RecoverFile
    W9: what ``recover_file=`` costs tiny jobs, as a ratio to the same jobs without
    it, for the backends that journal (dispynb's `JobCluster`).
Sizes, FULL, QUICK
    Job counts and payload sizes for a normal run and for ``--quick``.

Every workload checks the results it gets back (after the clock stops), so a backend
that drops or corrupts work fails loudly instead of looking fast. Inputs (argument
tuples, payloads) are built before the clock starts. Each workload is warmed up with
one full untimed round: with less, the first bandwidth repetition of both backends was
about 30% slower than the others (page faults on fresh buffers).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from backends import Backend, BenchmarkError
from quiet import MAX_WAIT as QUIET_MAX_WAIT
from quiet import wait_until_quiet

__all__ = [
    "FULL",
    "QUICK",
    "Bandwidth",
    "CpuBound",
    "ExecutorMap",
    "Latency",
    "Metric",
    "RecoverFile",
    "SharedObject",
    "Sizes",
    "Throughput",
    "Workload",
]

MB = 1_000_000  # bytes; bandwidth is reported in decimal megabytes per second


@dataclass(frozen=True, slots=True, kw_only=True)
class Metric:
    """One reported number.

    Attributes
    ----------
    key:
        Stable key in the JSON results (``"throughput"``, ``"latency_median"`` ...).
    label:
        Row label in the printed table.
    unit:
        ``"jobs/s"``, ``"ms"`` or ``"MB/s"``.
    higher_is_better:
        Direction used for "best" and for the ratio note.
    """

    key: str
    label: str
    unit: str
    higher_is_better: bool

    def best(self, values: list[float]) -> float:
        """The best of several repetitions."""
        return max(values) if self.higher_is_better else min(values)


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizes:
    """Job counts and payload sizes of one run."""

    throughput_jobs: int
    latency_trips: int
    cpu_jobs: int
    cpu_seconds: float
    bandwidth_jobs: int
    bandwidth_bytes: int
    shared_object_jobs: int = 200
    shared_object_bytes: int = 100 * MB
    shared_object_workers: int = 4
    executor_map_calls: int = 100_000
    recover_file_jobs: int = 2_000
    #: Seconds W4 cold waits at most for quiet CPUs (`quiet.wait_until_quiet`).
    quiet_max_wait: float = QUIET_MAX_WAIT


FULL = Sizes(
    throughput_jobs=2000,
    latency_trips=200,
    cpu_jobs=40,
    cpu_seconds=0.25,
    bandwidth_jobs=20,
    bandwidth_bytes=10 * MB,
)
QUICK = Sizes(
    throughput_jobs=200,
    latency_trips=30,
    cpu_jobs=4,
    cpu_seconds=0.05,
    bandwidth_jobs=4,
    bandwidth_bytes=2 * MB,
    shared_object_jobs=20,
    shared_object_bytes=10 * MB,
    executor_map_calls=2_000,
    recover_file_jobs=200,
    quiet_max_wait=1.0,  # a smoke run: the numbers are not read
)


class Workload(Protocol):
    """A workload: warmed up once per backend, then measured R times."""

    name: str
    metrics: tuple[Metric, ...]

    def describe(self) -> dict[str, Any]:
        """Counts and sizes recorded in the JSON results."""

    def warm_up(self, backend: Backend) -> None:
        """Run one untimed round so that workers, clusters and memory are ready."""

    def measure(self, backend: Backend) -> dict[str, float]:
        """Run one timed repetition; return a value for each metric key."""


@dataclass(slots=True, kw_only=True)
class Throughput:
    """``jobs`` trivial jobs submitted at once; jobs/s until all results are back."""

    fn: Callable[[int], int]
    jobs: int
    name: str = "throughput"
    metrics: tuple[Metric, ...] = (
        Metric(
            key="throughput",
            label="throughput",
            unit="jobs/s",
            higher_is_better=True,
        ),
    )

    def describe(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "function": "inc(x) -> x + 1"}

    def warm_up(self, backend: Backend) -> None:
        self._run(backend, self.jobs)

    def measure(self, backend: Backend) -> dict[str, float]:
        return {"throughput": self.jobs / self._run(backend, self.jobs)}

    def _run(self, backend: Backend, jobs: int) -> float:
        """Run ``jobs`` jobs, check the results and return the elapsed seconds."""
        arglists = [(i,) for i in range(jobs)]
        start = time.perf_counter()
        results = backend.submit_and_wait(self.fn, arglists)
        elapsed = time.perf_counter() - start
        if results != [i + 1 for i in range(jobs)]:
            raise BenchmarkError(f"{backend.name}: wrong results for {self.name}")
        return elapsed


@dataclass(slots=True, kw_only=True)
class ExecutorMap:
    """W8: ``list(executor.map(fn, range(calls)))`` with the default ``chunksize``
    (1), as a user replacing ProcessPoolExecutor writes it; calls/s until all
    results are back. Only for backends with ``map_calls`` (`supports`)."""

    fn: Callable[[int], int]
    calls: int
    name: str = "executor_map"
    metrics: tuple[Metric, ...] = (
        Metric(
            key="executor_map",
            label="Executor.map, small calls",
            unit="calls/s",
            higher_is_better=True,
        ),
    )

    @staticmethod
    def supports(backend: Backend) -> bool:
        """Whether ``backend`` is an executor with a ``map`` (``map_calls``)."""
        return getattr(backend, "map_calls", None) is not None

    def describe(self) -> dict[str, Any]:
        return {"calls": self.calls, "chunksize": 1, "function": "inc(x) -> x + 1"}

    def warm_up(self, backend: Backend) -> None:
        self._run(backend, self.calls)

    def measure(self, backend: Backend) -> dict[str, float]:
        return {"executor_map": self.calls / self._run(backend, self.calls)}

    def _run(self, backend: Backend, calls: int) -> float:
        """Map ``calls`` calls, check the results and return the elapsed seconds."""
        map_calls = getattr(backend, "map_calls")  # noqa: B009 - not in Backend
        start = time.perf_counter()
        results = map_calls(self.fn, range(calls))
        elapsed = time.perf_counter() - start
        if results != [i + 1 for i in range(calls)]:
            raise BenchmarkError(f"{backend.name}: wrong results for {self.name}")
        return elapsed


@dataclass(slots=True, kw_only=True)
class RecoverFile:
    """W9: ``jobs`` trivial jobs submitted at once, as in W1, on a cluster without
    ``recover_file`` and on the same kind of cluster with one, one after the other
    in each repetition (the machine's noise falls on both); microseconds per job
    each, and their ratio. Only for backends with ``journal_round`` (`supports`)."""

    fn: Callable[[int], int]
    jobs: int
    name: str = "recover_file"
    metrics: tuple[Metric, ...] = (
        Metric(
            key="recover_file_off",
            label="tiny jobs",
            unit="us/job",
            higher_is_better=False,
        ),
        Metric(
            key="recover_file_on",
            label="tiny jobs, recover_file",
            unit="us/job",
            higher_is_better=False,
        ),
        Metric(
            key="recover_file_ratio",
            label="recover_file cost",
            unit="ratio",
            higher_is_better=False,
        ),
    )

    @staticmethod
    def supports(backend: Backend) -> bool:
        """Whether ``backend`` journals jobs (``journal_round``)."""
        return getattr(backend, "journal_round", None) is not None

    def describe(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "function": "inc(x) -> x + 1"}

    def warm_up(self, backend: Backend) -> None:
        self.measure(backend)

    def measure(self, backend: Backend) -> dict[str, float]:
        off = self._run(backend, journaled=False) / self.jobs * 1e6
        on = self._run(backend, journaled=True) / self.jobs * 1e6
        return {
            "recover_file_off": off,
            "recover_file_on": on,
            "recover_file_ratio": on / off,
        }

    def _run(self, backend: Backend, journaled: bool) -> float:
        """One round; check the results and return the elapsed seconds."""
        arglists = [(i,) for i in range(self.jobs)]
        journal_round = getattr(backend, "journal_round")  # noqa: B009
        elapsed, results = journal_round(self.fn, arglists, journaled)
        if results != [i + 1 for i in range(self.jobs)]:
            raise BenchmarkError(f"{backend.name}: wrong results for {self.name}")
        return float(elapsed)


@dataclass(slots=True, kw_only=True)
class Latency:
    """``trips`` sequential round trips of one trivial job; median and p95 in ms."""

    fn: Callable[[int], int]
    trips: int
    name: str = "latency"
    metrics: tuple[Metric, ...] = (
        Metric(
            key="latency_median",
            label="round trip, median",
            unit="ms",
            higher_is_better=False,
        ),
        Metric(
            key="latency_p95",
            label="round trip, p95",
            unit="ms",
            higher_is_better=False,
        ),
    )

    def describe(self) -> dict[str, Any]:
        return {"round_trips": self.trips, "function": "inc(x) -> x + 1"}

    def warm_up(self, backend: Backend) -> None:
        self._run(backend, self.trips)

    def measure(self, backend: Backend) -> dict[str, float]:
        times = sorted(self._run(backend, self.trips))
        p95 = times[math.ceil(0.95 * len(times)) - 1]  # nearest rank
        return {
            "latency_median": statistics.median(times) * 1000,
            "latency_p95": p95 * 1000,
        }

    def _run(self, backend: Backend, trips: int) -> list[float]:
        """Run ``trips`` round trips; return the seconds each took."""
        times: list[float] = []
        for i in range(trips):
            start = time.perf_counter()
            result = backend.round_trip(self.fn, i)
            times.append(time.perf_counter() - start)
            if result != i + 1:
                raise BenchmarkError(f"{backend.name}: wrong result for {self.name}")
        return times


@dataclass(slots=True, kw_only=True)
class CpuBound:
    """``jobs`` CPU-bound jobs of about ``seconds`` each; efficiency on W workers.

    ``fn(n)`` must spin for ``n`` loop iterations and return ``n * (n - 1) // 2``;
    ``n`` is calibrated by the caller so that one call takes about the wanted time.
    The serial time is measured in the benchmark process itself: the median of a few
    calls of the same function just before and just after each timed repetition,
    times ``jobs``. On a shared VM one call's time drifts by +-20% from minute to
    minute, so a reference taken once per framework made the ratio noise (several
    frameworks scored above 1.0); an adjacent one compares like with like.
    Efficiency = serial time / (W x wall time); 1.0 means no overhead at all.
    """

    fn: Callable[[int], int]
    jobs: int
    n: int
    workers: int
    serial_calls: int = 5
    #: Serial calls before and after each timed repetition (each side).
    adjacent_calls: int = 3
    name: str = "cpu"
    metrics: tuple[Metric, ...] = (
        Metric(
            key="cpu_efficiency",
            label="CPU-bound efficiency",
            unit="ratio",
            higher_is_better=True,
        ),
        Metric(
            key="cpu_wall",
            label="CPU-bound wall time",
            unit="s",
            higher_is_better=False,
        ),
        Metric(
            key="cpu_serial_job",
            label="CPU-bound job, serial reference",
            unit="s",
            higher_is_better=False,
        ),
    )
    serial_job_seconds: float | None = field(default=None, init=False)

    def describe(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "iterations": self.n,
            "serial_job_seconds": self.serial_job_seconds,
            "function": "spin(n): a pure-Python loop of n additions",
        }

    def measure_serial(self) -> float:
        """Time the function here, without any backend; returns seconds per job."""
        self.serial_job_seconds = statistics.median(self._time_calls(self.serial_calls))
        return self.serial_job_seconds

    def _time_calls(self, calls: int) -> list[float]:
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            self.fn(self.n)
            times.append(time.perf_counter() - start)
        return times

    def warm_up(self, backend: Backend) -> None:
        if self.serial_job_seconds is None:
            self.measure_serial()
        self._run(backend, self.workers)

    def measure(self, backend: Backend) -> dict[str, float]:
        before = self._time_calls(self.adjacent_calls)
        elapsed = self._run(backend, self.jobs)
        after = self._time_calls(self.adjacent_calls)
        per_job = statistics.median(before + after)
        return {
            "cpu_efficiency": per_job * self.jobs / (self.workers * elapsed),
            "cpu_wall": elapsed,
            "cpu_serial_job": per_job,
        }

    def _run(self, backend: Backend, jobs: int) -> float:
        start = time.perf_counter()
        results = backend.submit_and_wait(self.fn, [(self.n,)] * jobs)
        elapsed = time.perf_counter() - start
        if results != [self.n * (self.n - 1) // 2] * jobs:
            raise BenchmarkError(f"{backend.name}: wrong results for {self.name}")
        return elapsed


def fresh_payloads(jobs: int, size: int) -> list[bytes]:
    """``jobs`` random, pairwise different payloads of ``size`` bytes (new memory)."""
    base = os.urandom(size)
    return [i.to_bytes(8, "little") + base[8:] for i in range(jobs)]


@dataclass(slots=True, kw_only=True)
class Bandwidth:
    """``jobs`` jobs each sending ``size`` bytes and returning ``len``; MB/s.

    The payloads are random and pairwise different (each starts with its index), so
    neither compression nor a content cache can make a backend look faster.

    Before each timed repetition (the first too) the workload waits the backend's
    ``release_wait`` seconds, untimed (0 unless the backend sets it): an engine that
    frees the arguments of a repetition asynchronously (Ray: a task's argument leaves
    its object store some time after the task ended) still holds them when the next
    repetition starts at once, so that one's arguments go to object-store memory no
    process touched before, and each of its pages costs the sender a page fault
    (2,441 per 10 MB, about 15 us each on the benchmark VM). How many of the 20
    arguments land there was a race, which made W4 on Ray bimodal (per repetition
    about 300-700 or 1,300-2,500 MB/s) for raw Ray and dispynb on Ray alike. Both
    Ray rows wait the same time, so each repetition starts on a store the previous
    one has left.
    """

    fn: Callable[[bytes], int]
    jobs: int
    size: int
    name: str = "bandwidth"
    metrics: tuple[Metric, ...] = (
        Metric(
            key="bandwidth",
            label="bandwidth",
            unit="MB/s",
            higher_is_better=True,
        ),
    )
    #: Seconds W4 cold waits at most for quiet CPUs before its clock starts.
    quiet_max_wait: float = QUIET_MAX_WAIT
    _payloads: list[bytes] | None = field(default=None, init=False, repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "bytes_per_job": self.size,
            "function": "size(data) -> len(data)",
        }

    def warm_up(self, backend: Backend) -> None:
        self._run(backend, self._get_payloads())

    def measure(self, backend: Backend) -> dict[str, float]:
        payloads = self._get_payloads()
        time.sleep(getattr(backend, "release_wait", 0.0))
        elapsed = self._run(backend, payloads)
        return {"bandwidth": len(payloads) * self.size / MB / elapsed}

    def _get_payloads(self) -> list[bytes]:
        if self._payloads is None:
            self._payloads = fresh_payloads(self.jobs, self.size)
        return self._payloads

    def measure_cold(self, backend: Backend) -> dict[str, float | None]:
        """W4 cold: fresh payloads, on a backend that ran one tiny job only.

        The caller starts a new backend for every repetition; here one job with a
        1-byte argument warms it (the function is shipped, a worker is up), then the
        payloads are created (never seen by any process before) and timed, once the
        machine's CPUs are quiet (`quiet.wait_until_quiet`, the same for every
        backend: a few hundred milliseconds of someone else's work decided
        repetitions). The wait and the load it ended at are returned too.
        """
        if backend.round_trip(self.fn, b"x") != 1:
            raise BenchmarkError(f"{backend.name}: wrong result for the cold warm-up")
        payloads = fresh_payloads(self.jobs, self.size)
        settled = wait_until_quiet(max_wait=self.quiet_max_wait)
        elapsed = self._run(backend, payloads)
        return {
            "bandwidth_cold": len(payloads) * self.size / MB / elapsed,
            "quiet_wait": settled["waited"],
            "busy_at_start": settled["busy"],
        }

    def _run(self, backend: Backend, payloads: list[bytes]) -> float:
        """Send ``payloads``, check the lengths and return the elapsed seconds."""
        start = time.perf_counter()
        results = backend.submit_and_wait(self.fn, [(p,) for p in payloads])
        elapsed = time.perf_counter() - start
        if results != [self.size] * len(payloads):
            raise BenchmarkError(f"{backend.name}: wrong results for {self.name}")
        return elapsed


@dataclass(slots=True, kw_only=True)
class SharedObject:
    """W7: one ``size``-byte object used by ``jobs`` jobs; seconds, from handing the
    object to the framework until every result is back.

    Each repetition runs in a fresh process on a new backend (W7 mode of
    ``driver.py``) with a fresh random object, after one tiny job of the same
    function. The object goes through the framework's own way of sharing
    (``Backend.share``: dispynb ``JobCluster.put``, Ray ``ray.put``, Dask
    ``scatter(broadcast=True)``) and every job gets the handle.
    """

    fn: Callable[[bytes, int], int]
    jobs: int
    size: int
    name: str = "shared_object"
    metrics: tuple[Metric, ...] = (
        Metric(
            key="shared_object",
            label="shared object",
            unit="s",
            higher_is_better=False,
        ),
    )

    def measure_once(self, backend: Any) -> dict[str, float]:
        """One repetition on a started backend that has a ``share`` method."""
        if backend.submit_and_wait(self.fn, [(b"x", 0)]) != [1]:
            raise BenchmarkError(f"{backend.name}: wrong result for the W7 warm-up")
        data = os.urandom(self.size)
        start = time.perf_counter()
        handle = backend.share(self.fn, data)
        results = backend.submit_and_wait(
            self.fn, [(handle, i) for i in range(self.jobs)]
        )
        elapsed = time.perf_counter() - start
        if results != [self.size + i for i in range(self.jobs)]:
            raise BenchmarkError(f"{backend.name}: wrong results for {self.name}")
        return {"shared_object": elapsed}
