"""Side-by-side benchmark of dispynb and its peers (issue 7): one command, one JSON.

``.venv/bin/python bench/run.py`` installs the peers' private environments if needed
(``venvs.py``, needs the package index), then re-runs itself inside a private network
namespace (``unshare -n`` with only ``lo`` up: the network rule) where it measures every
selected backend one after another, each in its own driver process (``driver.py``), and
writes ``bench/results/<UTC timestamp>.json``. ``--scale`` adds dispynb's scale curve
(``scale.py``); ``--report`` renders ``docs/benchmarks.md`` and the PNG plots from the
JSON (``plot.py``, run with the ``plot`` environment's matplotlib).

``./dev bench`` starts this script already inside a namespace: there the environments
must exist (``run.py --prepare`` creates them).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
from backends import BACKENDS
from report import build_report, format_table, write_report
from venvs import VenvError, ensure_venv

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS_DIR = BENCH / "results"
DOCS = ROOT / "docs"
WORKLOAD_NAMES = (
    "throughput",
    "latency",
    "cpu",
    "bandwidth",
    "bandwidth_cold",
    "startup",
    "closure",
    "shared_object",
    "executor_map",
    "recover_file",
)
#: Workloads measured by the ``main`` driver (one started backend for all).
MAIN_WORKLOADS = (
    "throughput",
    "latency",
    "cpu",
    "bandwidth",
    "closure",
    "executor_map",
    "recover_file",
)
#: Seconds one driver process may take before it is killed (per mode).
TIMEOUTS = {"main": 1800.0, "cold": 300.0, "startup": 180.0, "objects": 600.0}
PR_SET_CHILD_SUBREAPER = 36


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark dispynb against dispy, ipyparallel, Dask, Ray, loky"
        " and ProcessPoolExecutor on this machine (loopback only).",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=2,
        metavar="W",
        help="workers (CPUs) of every framework (default: 2)",
    )
    parser.add_argument(
        "--repeat",
        type=_positive_int,
        default=None,
        metavar="R",
        help="timed repetitions (default: 3, or 1 with --quick)",
    )
    parser.add_argument(
        "--only",
        choices=WORKLOAD_NAMES,
        action="append",
        help="run only this workload (may be repeated)",
    )
    parser.add_argument(
        "--backends",
        type=_backend_list,
        default=None,
        metavar="NAMES",
        help="comma-separated backends, or 'all'"
        f" (default: all = {','.join(BACKENDS)})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small counts and sizes: a smoke test, not a measurement",
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="also measure dispynb's scale curve (scale.py)",
    )
    parser.add_argument(
        "--cross-host",
        action="store_true",
        help="measure W1 and W4 across network-namespace hosts beside raw TCP, and"
        " the cross-host scale curve (crosshost.py; needs root); alone, with no"
        " --backends, it measures only that",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="write docs/benchmarks.md and docs/*.png from the results",
    )
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="only create the environments the selection needs",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        metavar="DIR",
        help="where to write the JSON (default: bench/results/)",
    )
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.backends is None:
        args.backends = [] if args.cross_host else list(BACKENDS)
    return args


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _backend_list(text: str) -> list[str]:
    if text.strip() == "all":
        return list(BACKENDS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown backend(s) {', '.join(unknown) or '(none given)'};"
            f" choose from {', '.join(BACKENDS)} or 'all'"
        )
    return [name for name in BACKENDS if name in names]


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def needed_venvs(args: argparse.Namespace) -> list[str]:
    """The private environments this selection needs."""
    names = [v for name in args.backends if (v := BACKENDS[name].venv)]
    return names + (["plot"] if args.report else [])


def is_isolated() -> bool:
    """Whether this process is in a network namespace with only loopback."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def needs_isolation(args: argparse.Namespace) -> bool:
    """ProcessPoolExecutor alone uses pipes only; everything else uses sockets."""
    return args.scale or any(name != "ppe" for name in args.backends)


def reexec_isolated(argv: Sequence[str]) -> int:
    """Run this script again inside ``unshare -n`` with ``lo`` up; its exit code."""
    command = [
        "unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
        sys.executable, str(Path(__file__).resolve()), *argv,
    ]  # fmt: skip
    _progress("bench: entering a private network namespace (unshare -n)")
    try:
        return subprocess.call(command)
    except OSError as exc:
        _progress(f"bench: cannot run unshare ({exc}); run ./dev bench as root")
        return 1


def become_subreaper() -> None:
    """Adopt orphaned descendants, so processes a framework leaves behind can be
    found and stopped after its driver exits (Linux only; harmless elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def reap_leftovers() -> list[str]:
    """Stop processes left behind by a driver (our own descendants only)."""
    left = psutil.Process().children(recursive=True)
    labels = []
    for proc in left:
        try:
            labels.append(proc.name())
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return labels


def run_driver(python: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Run ``driver.py`` once with ``python``; return its JSON result (or an error)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp) / "result.json"
        params = {**params, "out": str(out)}
        try:
            subprocess.run(
                [str(python), str(BENCH / "driver.py")],
                input=json.dumps(params),
                text=True,
                cwd=BENCH,
                stdout=sys.stderr,  # frameworks' chatter must not mix with the table
                timeout=TIMEOUTS[params["mode"]],
                check=False,
            )
        except subprocess.TimeoutExpired:
            result: dict[str, Any] = {
                "error": f"timed out after {TIMEOUTS[params['mode']]:.0f} s"
            }
        else:
            try:
                result = json.loads(out.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                result = {"error": f"the driver wrote no result ({exc})"}
    leftovers = reap_leftovers()
    if leftovers:
        result.setdefault("leftover_processes", []).extend(leftovers)
    return result


#: The project's packages (what ``pip install`` puts in site-packages).
PROJECT_PACKAGES = ("dispynb", "nodeserver", "schedserver")


def compile_project(packages: Sequence[str] = PROJECT_PACKAGES) -> str:
    """Compile the modules of ``packages`` (as this run imports them) to bytecode
    beside their sources, as ``pip install`` does for an installed package; what the
    run says of it (``config.bytecode``).

    The peers run from environments pip installed, their bytecode compiled. dispynb
    runs from this tree, and where ``PYTHONDONTWRITEBYTECODE`` is set nothing ever
    wrote its bytecode: every node server, client and computation started in the
    run compiled some 300 modules again, about 0.2 s of CPU in each W5 start (0.47
    against 0.27 s, client and node) and 1.3-1.8 MiB more node PSS (the heap
    compiling left), which no installed dispynb pays. `compileall` writes
    regardless of that setting; an interpreter only reads what it finds.
    """
    import compileall
    import importlib.util

    folders = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            folders += list(spec.submodule_search_locations)
    if not folders:
        return "not compiled: none of the project's packages found"
    with contextlib.redirect_stdout(sys.stderr):
        written = all([compileall.compile_dir(f, quiet=1) for f in folders])
    shown = ", ".join(_shown(folder) for folder in folders)
    if not written:
        return f"not all compiled (could not write under {shown})"
    return f"compiled before the run (compileall: {shown})"


def _shown(folder: str) -> str:
    """``folder`` relative to the repository when in it (the report is committed)."""
    path = Path(folder).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def calibrate_spin(seconds: float) -> int:
    """Loop iterations of ``driver.spin`` that take about ``seconds`` here."""
    from driver import spin

    probe = 200_000
    best = min(_timed(spin, probe) for _ in range(5))
    return max(int(probe * seconds / best), 1000)


def _timed(fn: Any, arg: Any) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def run_backend(
    name: str, python: Path, args: argparse.Namespace, spin_n: int
) -> dict[str, Any]:
    """Measure one backend: the main driver, then W4 cold and the W5 start-up
    repetitions (each in a fresh driver process)."""
    workloads = args.only or list(WORKLOAD_NAMES)
    params: dict[str, Any] = {
        "backend": name,
        "workers": args.workers,
        "repeat": args.repeat,
        "quick": args.quick,
        "spin_n": spin_n,
        "workloads": workloads,
        "closure_timeout": 30 if args.quick else 60,
    }
    result: dict[str, Any] = {"runs": {}}
    if any(w in MAIN_WORKLOADS for w in workloads):
        result = run_driver(python, {**params, "mode": "main"})
        if "error" in result:
            _progress(f"[{name}] FAILED: {result['error'].splitlines()[-1]}")
    if "bandwidth_cold" in workloads:
        for rep in range(1, args.repeat + 1):
            cold = run_driver(python, {**params, "mode": "cold"})
            if "error" in cold:
                result.setdefault("error", cold["error"])
                _progress(f"[{name}] cold W4 FAILED: {cold['error'].splitlines()[-1]}")
                break
            result.setdefault("runs", {}).setdefault("bandwidth_cold", []).append(
                cold["bandwidth_cold"]
            )
            # How long the repetition waited for quiet CPUs, and how busy they were
            # when its clock started (`quiet.wait_until_quiet`).
            result.setdefault("cold_start", []).append(
                {
                    "waited": cold.get("quiet_wait"),
                    "busy": cold.get("busy_at_start"),
                }
            )
            _progress(f"[{name}] cold W4 {rep}/{args.repeat}: {cold}")
    if "shared_object" in workloads:
        for rep in range(1, args.repeat + 1):
            shared = run_driver(python, {**params, "mode": "objects"})
            if "unsupported" in shared:
                result.setdefault("unsupported", {})["W7"] = shared["unsupported"]
                _progress(f"[{name}] W7 not supported: {shared['unsupported']}")
                break
            if "error" in shared:
                result.setdefault("error", shared["error"])
                _progress(f"[{name}] W7 FAILED: {shared['error'].splitlines()[-1]}")
                break
            result.setdefault("runs", {}).setdefault("shared_object", []).append(
                shared["shared_object"]
            )
            _progress(f"[{name}] W7 {rep}/{args.repeat}: {shared}")
    result["startup"] = []
    if "startup" in workloads:
        for rep in range(1, args.repeat + 1):
            startup = run_driver(python, {**params, "mode": "startup"})
            result["startup"].append(startup)
            _progress(f"[{name}] startup {rep}/{args.repeat}: {startup}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table and write the JSON. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    isolated = is_isolated()
    pythons: dict[str, Path] = {}
    try:
        for venv in needed_venvs(args):
            pythons[venv] = ensure_venv(venv, install=not isolated)
    except VenvError as exc:
        _progress(f"bench: {exc}")
        return 1
    if args.prepare:
        return 0
    if needs_isolation(args) and not isolated:
        return reexec_isolated(argv)
    become_subreaper()
    bytecode = compile_project()
    started = time.perf_counter()
    spin_n = calibrate_spin(0.05 if args.quick else 0.25)
    results: dict[str, dict[str, Any]] = {}
    for name in args.backends:
        venv = BACKENDS[name].venv
        python = pythons[venv] if venv else Path(sys.executable)
        results[name] = run_backend(name, python, args, spin_n)
    scale = None
    if args.scale:
        from scale import run_scale

        scale = run_scale(quick=args.quick, repeat=args.repeat)
    crosshost = None
    if args.cross_host:
        from crosshost import run_crosshost

        crosshost = run_crosshost(quick=args.quick, repeat=args.repeat)
    document = build_report(
        results=results,
        scale=scale,
        crosshost=crosshost,
        config={
            "workers": args.workers,
            "repeat": args.repeat,
            "quick": args.quick,
            "spin_iterations": spin_n,
            "command": "bench/run.py " + shlex.join(argv),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "bytecode": bytecode,
        },
    )
    print(format_table(document))
    path = write_report(document, args.results_dir)
    print(f"\nResults written to {path}")
    if args.report:
        subprocess.call(
            [str(pythons["plot"]), str(BENCH / "plot.py"), str(path), str(DOCS)]
        )
    # A peer that fails is reported in the table; only dispynb failing is an error.
    failed = "error" in results.get("dispynb", {}) or "error" in (crosshost or {})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
