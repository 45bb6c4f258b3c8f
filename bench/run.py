"""Side-by-side benchmark of dispynb and its peers: throughput, latency, bandwidth.

Run with ``./dev bench [options]``, which runs this script inside a private network
namespace where only ``lo`` is up (the network rule: loopback traffic only). See
``bench/README.md`` for what is measured and how to read the table.

The task functions are defined here, in ``__main__``, on purpose: that is where a user's
script defines them, cloudpickle ships ``__main__`` functions by value (the node cannot
import ``bench/``), and a forked pool worker finds them in its copy of ``__main__``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backends import BACKENDS, Backend, BenchmarkError
from report import build_report, format_table, write_report
from workloads import FULL, QUICK, Bandwidth, Latency, Throughput, Workload

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WORKLOAD_NAMES = ("throughput", "latency", "bandwidth")
# ProcessPoolExecutor runs first so that it forks from a process without the threads
# and subprocesses dispynb starts; results are printed in BACKENDS order regardless.
RUN_ORDER = ("ppe", "dispynb")


def inc(x: int) -> int:
    """The trivial job of the throughput and latency workloads."""
    return x + 1


def size(data: bytes) -> int:
    """The bandwidth job: the payload travels, only its length comes back."""
    return len(data)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark dispynb against ProcessPoolExecutor on one machine.",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=2,
        metavar="W",
        help="CPUs of the dispynb node and max_workers of the pool (default: 2)",
    )
    parser.add_argument(
        "--repeat",
        type=_positive_int,
        default=None,
        metavar="R",
        help="timed repetitions of each workload (default: 3, or 1 with --quick)",
    )
    parser.add_argument(
        "--only",
        choices=WORKLOAD_NAMES,
        action="append",
        help="run only this workload (may be given several times)",
    )
    parser.add_argument(
        "--backends",
        type=_backend_list,
        default=list(BACKENDS),
        metavar="NAMES",
        help=f"comma-separated backends to run (default: {','.join(BACKENDS)})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small counts and sizes, for a smoke test (numbers not meaningful)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        metavar="DIR",
        help="where to write the JSON results (default: bench/results/)",
    )
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    return args


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _backend_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown backend(s) {', '.join(unknown) or '(none given)'};"
            f" choose from {', '.join(BACKENDS)}"
        )
    return names


def make_workloads(args: argparse.Namespace) -> list[Workload]:
    """The selected workloads, sized for a normal or a ``--quick`` run."""
    sizes = QUICK if args.quick else FULL
    workloads: dict[str, Workload] = {
        "throughput": Throughput(fn=inc, jobs=sizes.throughput_jobs),
        "latency": Latency(fn=inc, trips=sizes.latency_trips),
        "bandwidth": Bandwidth(
            fn=size, jobs=sizes.bandwidth_jobs, size=sizes.bandwidth_bytes
        ),
    }
    selected = args.only or WORKLOAD_NAMES
    return [workloads[name] for name in WORKLOAD_NAMES if name in selected]


def run_backend(
    backend: Backend, workloads: Sequence[Workload], repeat: int
) -> dict[str, list[float]]:
    """Start ``backend``, warm up and measure every workload, close it.

    Returns
    -------
    dict
        Metric key -> the value of each repetition.
    """
    runs: dict[str, list[float]] = {}
    _progress(f"[{backend.name}] starting")
    backend.start()
    try:
        for workload in workloads:
            workload.warm_up(backend)
            for rep in range(1, repeat + 1):
                values = workload.measure(backend)
                for key, value in values.items():
                    runs.setdefault(key, []).append(value)
                shown = ", ".join(f"{k} {v:,.3f}" for k, v in values.items())
                _progress(f"[{backend.name}] {workload.name} {rep}/{repeat}: {shown}")
    finally:
        backend.close()
    return runs


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table and write the JSON. Returns the exit code."""
    args = parse_args(argv)
    workloads = make_workloads(args)
    order = [name for name in RUN_ORDER if name in args.backends]
    order += [name for name in args.backends if name not in order]
    runs: dict[str, dict[str, list[float]]] = {}
    details: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for name in order:
        backend = BACKENDS[name](args.workers)
        try:
            backend_runs = run_backend(backend, workloads, args.repeat)
        except BenchmarkError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        details[name] = {"label": backend.label, **backend.describe()}
        for key, values in backend_runs.items():
            runs.setdefault(key, {})[name] = values
    # Columns (and the JSON) follow the registry order, not the run order.
    details = {name: details[name] for name in BACKENDS if name in details}
    document = build_report(
        metrics=[metric for w in workloads for metric in w.metrics],
        runs={
            key: {n: per[n] for n in BACKENDS if n in per} for key, per in runs.items()
        },
        backends=details,
        config={
            "workers": args.workers,
            "repeat": args.repeat,
            "quick": args.quick,
            "workloads": {w.name: w.describe() for w in workloads},
            "wall_seconds": round(time.perf_counter() - started, 3),
        },
    )
    print(format_table(document))
    path = write_report(document, args.results_dir)
    print(f"\nResults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
