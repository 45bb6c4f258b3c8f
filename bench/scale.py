"""dispynb's scale curve: more node processes, more queued jobs (issue 7, item 3).

``run_scale`` (called by ``run.py --scale`` inside the namespace) runs this file as a
separate process with the project's interpreter, so the client's memory is measured
in a fresh process, and returns its JSON result.

Nodes
    For N = 1, 2, 4, 8, 16 node processes of one CPU each (``LocalCluster(nodes=N,
    cpus=1)``, on a 2-CPU machine, so from 8 nodes on they compete for the CPUs):
    jobs/s for the trivial job, wall time per job, and the scheduling overhead per
    job as CPU time, in the client and in all node processes together.
Queued jobs
    For Q = 10^3, 10^4, 10^5 jobs that sleep, submitted without waiting: the growth
    of the client's RSS divided by Q (memory per pending job), the submit rate, and
    the time ``close(terminate=True)`` takes to drop them.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


def inc(x: int) -> int:
    """The trivial job."""
    return x + 1


def pause(x: int) -> int:
    """A job that keeps its CPU for a while, so that the others stay queued."""
    time.sleep(30)
    return x


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _cpu_seconds(procs: list[Any]) -> float:
    """User + system CPU seconds of live processes (psutil.Process objects)."""
    import psutil

    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def measure_nodes(counts: list[int], jobs: int, repeat: int) -> list[dict[str, Any]]:
    """jobs/s and per-job overhead for each number of one-CPU node processes."""
    import psutil

    from dispynb import JobCluster, LocalCluster

    rows = []
    for count in counts:
        with (
            LocalCluster(nodes=count, cpus=1) as local,
            JobCluster(inc, nodes=local) as cluster,
        ):
            [job() for job in [cluster.submit(i) for i in range(jobs)]]  # warm-up
            nodes = psutil.Process().children(recursive=True)
            runs = []
            for _ in range(repeat):
                client0, nodes0 = time.process_time(), _cpu_seconds(nodes)
                start = time.perf_counter()
                submitted = [cluster.submit(i) for i in range(jobs)]
                results = [job() for job in submitted]
                wall = time.perf_counter() - start
                client = time.process_time() - client0
                node_cpu = _cpu_seconds(nodes) - nodes0
                if results != [i + 1 for i in range(jobs)]:
                    raise RuntimeError(f"wrong results with {count} nodes")
                runs.append((jobs / wall, client / jobs, node_cpu / jobs))
        row = {
            "nodes": count,
            "jobs": jobs,
            "jobs_per_s": [r[0] for r in runs],
            "client_cpu_us_per_job": [r[1] * 1e6 for r in runs],
            "nodes_cpu_us_per_job": [r[2] * 1e6 for r in runs],
        }
        rows.append(row)
        rate = statistics.median(row["jobs_per_s"])
        _progress(
            f"[scale] {count} nodes: {rate:,.0f} jobs/s,"
            f" client {statistics.median(row['client_cpu_us_per_job']):.0f} us/job,"
            f" nodes {statistics.median(row['nodes_cpu_us_per_job']):.0f} us/job"
        )
    return rows


def measure_queued(sizes: list[int]) -> list[dict[str, Any]]:
    """Client memory per pending job for each queue size in ``sizes``.

    ``run_scale`` passes one size per process: memory freed by an earlier size would
    otherwise be reused and hide the growth."""
    from memory import process_memory

    from dispynb import JobCluster, LocalCluster

    rows = []
    with LocalCluster(nodes=1, cpus=2) as local:
        for size in sizes:
            cluster = JobCluster(pause, nodes=local)
            gc.collect()
            before = process_memory(os.getpid())["rss"]
            start = time.perf_counter()
            jobs = [cluster.submit(i) for i in range(size)]
            submit = time.perf_counter() - start
            time.sleep(0.5)  # let the I/O thread take what it was handed
            gc.collect()
            after = process_memory(os.getpid())["rss"]
            start = time.perf_counter()
            cluster.close(terminate=True)
            close = time.perf_counter() - start
            row = {
                "queued": size,
                "rss_before": before,
                "rss_after": after,
                "bytes_per_job": (after - before) / size,
                "submit_per_s": size / submit,
                "close_terminate_s": close,
                "cancelled": sum(1 for job in jobs if job.status != job.Finished),
            }
            del jobs
            rows.append(row)
            _progress(
                f"[scale] {size:,} queued: {row['bytes_per_job']:,.0f} bytes/job,"
                f" submit {row['submit_per_s']:,.0f} jobs/s, close {close:.2f} s"
            )
    return rows


def _run_self(params: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run this file in a fresh process (the project's interpreter); its result."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        out = Path(tmp) / "scale.json"
        try:
            subprocess.run(
                [sys.executable, str(BENCH / "scale.py")],
                input=json.dumps({**params, "out": str(out)}),
                text=True,
                cwd=BENCH,
                stdout=sys.stderr,
                timeout=timeout,
                check=False,
            )
            result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
        except (subprocess.TimeoutExpired, OSError, ValueError) as exc:
            result = {"error": f"scale run failed: {exc}"}
    return result


def run_scale(*, quick: bool, repeat: int) -> dict[str, Any]:
    """The node curve in one fresh process, then each queue size in its own."""
    params: dict[str, Any] = {
        "node_counts": [1, 2] if quick else [1, 2, 4, 8, 16],
        "jobs": 200 if quick else 2000,
        "repeat": repeat,
        "queued": [1000, 2000] if quick else [1000, 10_000, 100_000],
    }
    result = _run_self({**params, "mode": "nodes"}, timeout=1200)
    result["queued"] = []
    for size in params["queued"]:
        queued = _run_self({"mode": "queued", "queued": [size]}, timeout=600)
        if "error" in queued:
            result.setdefault("error", queued["error"])
        result["queued"].extend(queued.get("queued", []))
    result["params"] = params
    return result


def main() -> None:
    """Read the parameters on stdin; write the result JSON to ``out``."""
    params = json.loads(sys.stdin.read())
    result: dict[str, Any] = {}
    try:
        if params["mode"] == "nodes":
            result["nodes"] = measure_nodes(
                params["node_counts"], params["jobs"], params["repeat"]
            )
        else:
            result["queued"] = measure_queued(params["queued"])
    except Exception as exc:
        import traceback

        result["error"] = "".join(traceback.format_exception(exc))[-4000:]
    Path(params["out"]).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
