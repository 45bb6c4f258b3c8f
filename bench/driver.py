"""One backend's benchmark process: run the workloads, write the numbers as JSON.

``run.py`` starts this script once per backend (and once per start-up repetition)
with the interpreter that backend needs: the project's for dispynb and
ProcessPoolExecutor, a private environment's for each peer (``venvs.py``). It reads
its parameters as JSON on stdin and writes its results as JSON to the file named by
the ``out`` parameter; progress goes to stderr.

Modes
-----
``main``
    Start the backend, record memory at rest, run W1-W4, W9 and W8 (warm-up + R
    repetitions each; W8 where the backend is an executor, W9 where it journals
    jobs for recovery), record peak memory,
    try W6, close.
``cold``
    W4 cold, one repetition: start the backend, one tiny job of the W4 function,
    then fresh payloads timed once the CPUs are quiet (``Bandwidth.measure_cold``,
    ``quiet.py``), close.
``startup``
    W5, one repetition: time from creating the cluster/client to the first result,
    then the time to close everything.

The task functions are defined here, in ``__main__``, on purpose: that is where a
user's script defines them. cloudpickle-based systems ship them by value, dispy ships
their source, a forked pool finds them in its copy of ``__main__``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from typing import Any

from backends import Backend, BenchmarkError, Unsupported, load_backend
from workloads import (
    FULL,
    QUICK,
    Bandwidth,
    CpuBound,
    ExecutorMap,
    Latency,
    RecoverFile,
    SharedObject,
    Throughput,
    Workload,
)

#: Seconds W6 waits for its one job before calling the attempt a failure.
CLOSURE_TIMEOUT = 60.0


def inc(x: int) -> int:
    """The trivial job of W1, W2 and W5."""
    return x + 1


def size(data: bytes) -> int:
    """The W4 job: the payload travels, only its length comes back."""
    return len(data)


def spin(n: int) -> int:
    """The W3 job: ``n`` pure-Python additions (calibrated to about 0.25 s)."""
    total = 0
    for i in range(n):
        total += i
    return total


def _double(x: int) -> int:
    """The helper function W6's closure calls (a global of ``__main__``)."""
    return 2 * x


def make_closure(offset: int) -> Any:
    """W6: a function defined in ``__main__`` with a closure and a helper."""

    def closure_job(x: int) -> int:
        return _double(x) + offset

    return closure_job


def progress(line: str) -> None:
    """A progress line on stderr (the parent shows it as it comes)."""
    print(line, file=sys.stderr, flush=True)


def make_workloads(params: dict[str, Any]) -> list[Workload]:
    """The selected W1-W4, W9 and W8 workloads, sized for a normal or a ``--quick``
    run."""
    sizes = QUICK if params["quick"] else FULL
    workloads: dict[str, Workload] = {
        "throughput": Throughput(fn=inc, jobs=sizes.throughput_jobs),
        "latency": Latency(fn=inc, trips=sizes.latency_trips),
        "cpu": CpuBound(
            fn=spin, jobs=sizes.cpu_jobs, n=params["spin_n"], workers=params["workers"]
        ),
        "bandwidth": Bandwidth(
            fn=size, jobs=sizes.bandwidth_jobs, size=sizes.bandwidth_bytes
        ),
        "recover_file": RecoverFile(fn=inc, jobs=sizes.recover_file_jobs),
        "executor_map": ExecutorMap(fn=inc, calls=sizes.executor_map_calls),
    }
    return [w for name, w in workloads.items() if name in params["workloads"]]


def run_closure(backend: Backend, timeout: float) -> dict[str, Any]:
    """W6: does a ``__main__`` closure calling a helper run with no declarations?"""
    outcome: dict[str, Any] = {
        "ok": False,
        "error": f"no result within {timeout:.0f} s",
    }

    def attempt() -> None:
        try:
            result = backend.round_trip(make_closure(5), 3)
        except BaseException as exc:
            text = f"{type(exc).__name__}: {exc}".strip()
            outcome.update(error=text[-1500:])
            return
        if result == 11:
            outcome.update(ok=True, error=None)
        else:
            outcome.update(error=f"wrong result {result!r} (expected 11)")

    thread = threading.Thread(target=attempt, name="w6", daemon=True)
    thread.start()
    thread.join(timeout)
    outcome["hung"] = thread.is_alive()
    return outcome


def run_main(params: dict[str, Any]) -> dict[str, Any]:
    """Mode ``main``: memory, W1-W4, W8, W9 and W6 on one started backend."""
    from memory import snapshot

    name = params["backend"]
    workloads = make_workloads(params)
    for workload in workloads:
        if isinstance(workload, CpuBound):
            serial = workload.measure_serial()
            progress(f"[{name}] serial spin: {serial:.3f} s per job")
    backend = load_backend(name, params["workers"])
    result: dict[str, Any] = {"runs": {}, "describe": backend.describe()}
    progress(f"[{name}] starting")
    backend.start()
    try:
        time.sleep(params.get("settle", 1.0))  # let start-up work finish: "at rest"
        # PSS too: a node's forked processes (its zygote) share most of their
        # pages, which the RSS sum counts once per process.
        result["memory_rest"] = snapshot(pss=True)
        for workload in workloads:
            if isinstance(workload, ExecutorMap | RecoverFile) and not (
                workload.supports(backend)
            ):
                continue  # not an executor (W8), or no journal (W9): no cell
            workload.warm_up(backend)
            for rep in range(1, params["repeat"] + 1):
                values = workload.measure(backend)
                for key, value in values.items():
                    result["runs"].setdefault(key, []).append(value)
                shown = ", ".join(f"{k} {v:,.3f}" for k, v in values.items())
                progress(f"[{name}] {workload.name} {rep}/{params['repeat']}: {shown}")
            if isinstance(workload, Throughput):
                # Issue 17: the nodes' memory after the same trivial jobs, by PSS
                # (shared pages split between the processes that map them).
                result["memory_after_w1"] = snapshot(pss=True)
        result["workloads"] = {w.name: w.describe() for w in workloads}
        result["memory_peak"] = snapshot()
        if "closure" in params["workloads"]:
            result["closure"] = run_closure(backend, params.get("closure_timeout", 60))
            progress(f"[{name}] closure: {result['closure']}")
    finally:
        if not result.get("closure", {}).get("hung"):
            backend.close()
    return result


def run_startup(params: dict[str, Any]) -> dict[str, Any]:
    """Mode ``startup`` (W5): create, first result, close; the framework is imported
    by the backend's constructor, before the clock starts."""
    backend = load_backend(params["backend"], params["workers"])
    start = time.perf_counter()
    backend.start()
    if backend.round_trip(inc, 1) != 2:
        raise BenchmarkError(f"{params['backend']}: wrong result for startup")
    first = time.perf_counter()
    backend.close()
    closed = time.perf_counter()
    return {"first_result": first - start, "close": closed - first}


def touch(data: bytes, i: int) -> int:
    """The W7 job: every job gets the same large object (through its handle)."""
    return len(data) + i


def run_objects(params: dict[str, Any]) -> dict[str, Any]:
    """Mode ``objects`` (W7): one repetition on a new backend with 4 workers (dispynb:
    4 local nodes of 1 CPU each); ``{"unsupported": ...}`` for a backend without a
    way to share an object (``share``) or one that refuses it."""
    sizes = QUICK if params["quick"] else FULL
    workers = sizes.shared_object_workers
    backend = load_backend(params["backend"], workers)
    if not hasattr(backend, "share"):
        return {"unsupported": f"{params['backend']} has no shared objects"}
    if hasattr(backend, "nodes"):  # dispynb: one node per worker
        backend.nodes = workers
    workload = SharedObject(
        fn=touch, jobs=sizes.shared_object_jobs, size=sizes.shared_object_bytes
    )
    backend.start()
    try:
        try:
            result = workload.measure_once(backend)
        except Unsupported as exc:
            return {"unsupported": str(exc)}
        result["config"] = backend.describe()["config"]
        return result
    finally:
        backend.close()


def run_cold(params: dict[str, Any]) -> dict[str, Any]:
    """Mode ``cold``: one W4 repetition on a new backend warmed by one tiny job."""
    sizes = QUICK if params["quick"] else FULL
    workload = Bandwidth(
        fn=size,
        jobs=sizes.bandwidth_jobs,
        size=sizes.bandwidth_bytes,
        quiet_max_wait=sizes.quiet_max_wait,
    )
    backend = load_backend(params["backend"], params["workers"])
    backend.start()
    try:
        return workload.measure_cold(backend)
    finally:
        backend.close()


def main() -> int:
    """Read the parameters, run the mode, write the JSON result (or the error)."""
    params = json.loads(sys.stdin.read())
    try:
        runners = {
            "main": run_main,
            "cold": run_cold,
            "startup": run_startup,
            "objects": run_objects,
        }
        runner = runners[params["mode"]]
        result = runner(params)
        status = 0
    except BaseException as exc:
        result = {"error": "".join(traceback.format_exception(exc))[-6000:]}
        status = 1
    with open(params["out"], "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    sys.stdout.flush()
    sys.stderr.flush()
    # Some frameworks leave non-daemon threads or atexit hooks that can hang at exit
    # once their cluster is gone; the result is written, so leave now.
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
