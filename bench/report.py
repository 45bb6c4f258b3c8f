"""The benchmark results document: JSON layout, statistics, issue 7's targets, table.

Contents
--------
METRICS
    Every reported number: key, label, unit, direction.
machine_info
    CPUs, Python, platform, memory and commit of the machine running the benchmark.
build_report
    Turn the drivers' raw results into the JSON document (the single source of the
    tables and plots).
evaluate_targets
    Issue 7's targets for dispynb, checked against the same run's peers.
format_table
    Render the document as a plain-text table.
write_report
    Write the document to ``<directory>/<UTC timestamp>.json``.

Pure Python (no psutil or matplotlib needed at import time), so ``plot.py`` can use it
from the plotting environment and the unit tests from the project's.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends import BACKENDS, PEERS
from crosshost_report import crosshost_text

__all__ = [
    "METRICS",
    "Metric",
    "build_report",
    "evaluate_engine_targets",
    "evaluate_targets",
    "format_table",
    "machine_info",
    "number",
    "write_report",
]

SUBJECT = "dispynb"
SCHEMA_VERSION = 2
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Metric:
    """One reported number: JSON key, table label, unit, direction."""

    key: str
    label: str
    unit: str
    higher_is_better: bool


METRICS: tuple[Metric, ...] = (
    Metric("throughput", "W1 throughput (trivial jobs)", "jobs/s", True),
    Metric("latency_median", "W2 round trip, median", "ms", False),
    Metric("latency_p95", "W2 round trip, p95", "ms", False),
    Metric("cpu_efficiency", "W3 efficiency (CPU-bound jobs)", "ratio", True),
    Metric("cpu_wall", "W3 wall time (40 jobs)", "s", False),
    Metric("cpu_serial_job", "W3 one job alone (reference)", "s", False),
    Metric("bandwidth", "W4 bandwidth (10 MB arguments)", "MB/s", True),
    Metric("bandwidth_cold", "W4 cold (fresh payloads, new cluster)", "MB/s", True),
    Metric("shared_object", "W7 one 100 MB object, 200 jobs, 4 workers", "s", False),
    Metric("executor_map", "W8 Executor.map of 100k small calls", "calls/s", True),
    Metric(
        "recover_file_off", "W9 tiny jobs (as W1), no recover_file", "us/job", False
    ),
    Metric("recover_file_on", "W9 the same jobs, recover_file", "us/job", False),
    Metric("recover_file_ratio", "W9 recover_file cost (with/without)", "ratio", False),
    Metric("start_first_result", "W5 start to first result", "s", False),
    Metric("start_close", "W5 close", "s", False),
    Metric("mem_nodes_rest", "nodes/workers at rest (RSS sum)", "MiB", False),
    Metric("mem_nodes_pss_rest", "nodes/workers at rest (PSS sum)", "MiB", False),
    Metric("mem_nodes_peak", "nodes/workers peak (sum of peaks)", "MiB", False),
    Metric("mem_nodes_pss_w1", "nodes/workers after W1 (PSS sum)", "MiB", False),
    Metric("mem_client_rest", "client at rest (RSS)", "MiB", False),
    Metric("mem_client_peak", "client peak (incl. W4 payloads)", "MiB", False),
)


def machine_info() -> dict[str, Any]:
    """Describe the machine and the interpreter running the benchmark."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "memory_bytes": None,
        "commit": _git_commit(),
    }
    try:
        import psutil

        info["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _stats(values: Sequence[float]) -> dict[str, Any]:
    return {
        "runs": list(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def _raw_values(result: Mapping[str, Any]) -> dict[str, list[float]]:
    """Metric key -> values of one backend's driver result."""
    values: dict[str, list[float]] = {k: list(v) for k, v in result["runs"].items()}
    startups = [s for s in result.get("startup", []) if "error" not in s]
    if startups:
        values["start_first_result"] = [s["first_result"] for s in startups]
        values["start_close"] = [s["close"] for s in startups]
    for phase in ("rest", "peak"):
        snap = result.get(f"memory_{phase}")
        if snap:
            nodes_key = "nodes_rss" if phase == "rest" else "nodes_hwm"
            client_key = "rss" if phase == "rest" else "hwm"
            values[f"mem_nodes_{phase}"] = [snap[nodes_key] / MIB]
            values[f"mem_client_{phase}"] = [snap["client"][client_key] / MIB]
    for key, snap in _pss_snapshots(result):
        if snap.get("nodes_pss") is not None:  # None: unreadable (`_unavailable`)
            values[key] = [snap["nodes_pss"] / MIB]
    return values


def _pss_snapshots(result: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """``(metric, snapshot)`` of the PSS sums one backend's driver measured."""
    pairs = (
        ("mem_nodes_pss_rest", "memory_rest"),
        ("mem_nodes_pss_w1", "memory_after_w1"),
    )
    return [
        (key, snap)
        for key, phase in pairs
        if (snap := result.get(phase)) and "nodes_pss" in snap
    ]


def _unavailable(result: Mapping[str, Any]) -> dict[str, str]:
    """Metric -> why it has no value for this backend (a PSS that could not be read:
    the report says so where the number would be, rather than a wrong 0)."""
    return {
        key: snap.get("pss_unavailable", "unavailable")
        for key, snap in _pss_snapshots(result)
        if snap["nodes_pss"] is None
    }


def build_report(
    *,
    results: Mapping[str, Mapping[str, Any]],
    config: Mapping[str, Any],
    scale: Mapping[str, Any] | None = None,
    crosshost: Mapping[str, Any] | None = None,
    machine: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the JSON document from the drivers' results.

    Parameters
    ----------
    results:
        ``results[backend]``: what ``run.run_backend`` returned (``runs``,
        ``describe``, ``memory_rest``/``memory_peak``, ``closure``, ``startup``, or
        ``error``).
    config:
        Workers, repetitions, the command line, wall time.
    scale:
        ``scale.run_scale``'s result, if measured.
    crosshost:
        ``crosshost.run_crosshost``'s result, if measured.
    machine:
        Overrides `machine_info` (for tests).
    """
    document: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": dict(machine) if machine is not None else machine_info(),
        "config": dict(config),
        "backends": {},
        "metrics": {},
        "closure": {},
        "memory": {},
        "scale": dict(scale) if scale else None,
        "crosshost": dict(crosshost) if crosshost else None,
    }
    per_backend: dict[str, dict[str, list[float]]] = {}
    for name in [n for n in BACKENDS if n in results]:
        result = results[name]
        details: dict[str, Any] = {"label": BACKENDS[name].label, "peer": name in PEERS}
        details.update(result.get("describe", {}))
        failures = [s["error"] for s in result.get("startup", []) if "error" in s]
        if "error" in result or failures:
            details["error"] = result.get("error") or failures[0]
        if result.get("leftover_processes"):
            details["leftover_processes"] = result["leftover_processes"]
        if result.get("cold_start"):
            details["cold_start"] = result["cold_start"]
        if result.get("unsupported"):
            details["unsupported"] = dict(result["unsupported"])
        if unavailable := _unavailable(result):
            details["unavailable"] = unavailable
        document["backends"][name] = details
        if "runs" in result:
            per_backend[name] = _raw_values(result)
        if "closure" in result:
            document["closure"][name] = result["closure"]
        if "memory_rest" in result:
            document["memory"][name] = {
                "rest": result["memory_rest"],
                "peak": result.get("memory_peak"),
                "after_w1": result.get("memory_after_w1"),
            }
    for metric in METRICS:
        found = {
            name: _stats(values[metric.key])
            for name, values in per_backend.items()
            if values.get(metric.key)
        }
        if found or any(
            metric.key in details.get("unavailable", {})
            for details in document["backends"].values()
        ):
            document["metrics"][metric.key] = {
                "label": metric.label,
                "unit": metric.unit,
                "higher_is_better": metric.higher_is_better,
                "results": found,
            }
    document["targets"] = evaluate_targets(document)
    return document


def _median(document: Mapping[str, Any], key: str, name: str) -> float | None:
    entry = document["metrics"].get(key, {}).get("results", {}).get(name)
    return None if entry is None else float(entry["median"])


def _best_peer(
    document: Mapping[str, Any], key: str, higher: bool
) -> tuple[str | None, float | None]:
    found = [
        (value, name)
        for name in PEERS
        if (value := _median(document, key, name)) is not None
    ]
    if not found:
        return None, None
    value, name = max(found) if higher else min(found)
    return name, value


def evaluate_targets(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 7's targets for dispynb's medians, each with the reference it uses.

    Every entry has ``target`` (text), ``value`` and ``limit`` (numbers or ``None``),
    ``unit``, ``reference`` (what the limit comes from), ``status`` (``PASS``,
    ``MISS`` or ``n/a`` when a number is missing) and ``ratio`` = value / limit.
    """
    targets: list[dict[str, Any]] = []

    def add(
        text: str,
        key: str,
        unit: str,
        limit: float | None,
        ref: str,
        higher: bool,
        strict: bool = False,
    ) -> None:
        value = _median(document, key, SUBJECT)
        status = "n/a"
        if value is not None and limit is not None:
            if higher:
                ok = value > limit if strict else value >= limit
            else:
                ok = value < limit if strict else value <= limit
            status = "PASS" if ok else "MISS"
        targets.append(
            {
                "target": text,
                "metric": key,
                "unit": unit,
                "value": value,
                "limit": limit,
                "reference": ref,
                "status": status,
                "ratio": value / limit if value is not None and limit else None,
            }
        )

    peer, best = _best_peer(document, "throughput", higher=True)
    add(
        "W1 >= 3x the best peer",
        "throughput",
        "jobs/s",
        3 * best if best else None,
        f"3 x {peer} ({best:,.0f})" if best else "-",
        higher=True,
    )
    ppe = _median(document, "throughput", "ppe")
    add(
        "W1 >= half of ProcessPoolExecutor",
        "throughput",
        "jobs/s",
        ppe / 2 if ppe else None,
        f"ppe / 2 ({ppe:,.0f} / 2)" if ppe else "-",
        higher=True,
    )
    peer, best = _best_peer(document, "latency_median", higher=False)
    add(
        "W2 median <= a third of the best peer's",
        "latency_median",
        "ms",
        best / 3 if best else None,
        f"{peer} / 3 ({best:.3f} / 3)" if best else "-",
        higher=False,
    )
    add("W3 efficiency >= 0.95", "cpu_efficiency", "ratio", 0.95, "fixed", higher=True)
    peer, best = _best_peer(document, "bandwidth", higher=True)
    add(
        "W4 >= the best peer",
        "bandwidth",
        "MB/s",
        best,
        f"{peer} ({best:,.0f})" if best else "-",
        higher=True,
    )
    ray_cold = document["metrics"].get("bandwidth_cold", {}).get("results", {})
    if "ray" in ray_cold and SUBJECT in ray_cold:
        worst = min(ray_cold[SUBJECT]["runs"])
        ray_median = ray_cold["ray"]["median"]
        targets.append(
            {
                "target": "W4 cold >= 2x Ray in every repetition",
                "metric": "bandwidth_cold",
                "unit": "MB/s",
                "value": worst,
                "limit": 2 * ray_median,
                "reference": f"slowest repetition vs 2 x ray ({ray_median:,.0f})",
                "status": "PASS" if worst >= 2 * ray_median else "MISS",
                "ratio": worst / (2 * ray_median),
            }
        )
    add(
        "W5 start to first result < 0.5 s",
        "start_first_result",
        "s",
        0.5,
        "fixed",
        higher=False,
        strict=True,
    )
    add("W5 close < 0.5 s", "start_close", "s", 0.5, "fixed", higher=False, strict=True)
    dispy = _median(document, "mem_nodes_rest", "dispy")
    add(
        "node memory at rest <= dispy's",
        "mem_nodes_rest",
        "MiB",
        dispy,
        f"dispy ({dispy:.1f})" if dispy else "-",
        higher=False,
    )
    dispy = _median(document, "mem_nodes_pss_w1", "dispy")
    add(
        "node PSS after W1 <= dispy's",
        "mem_nodes_pss_w1",
        "MiB",
        dispy,
        f"dispy ({dispy:.1f})" if dispy else "-",
        higher=False,
    )
    return targets


def number(value: float | None, unit: str) -> str:
    """A value formatted for its unit."""
    if value is None:
        return "-"
    if unit in {"ms", "s"}:
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if unit == "ratio":
        return f"{value:.3f}"
    if unit == "MiB":
        return f"{value:.1f}"
    return f"{value:,.0f}"


def cell(result: Mapping[str, Any] | None, unit: str) -> str:
    """``median [min-max]`` of one backend (just the value if measured once)."""
    if result is None:
        return "-"
    if len(result["runs"]) == 1:
        return number(result["median"], unit)
    low, high = number(result["min"], unit), number(result["max"], unit)
    return f"{number(result['median'], unit)} [{low}-{high}]"


def table_rows(document: Mapping[str, Any]) -> list[list[str]]:
    """Header plus one row per metric (and W6), cells as ``median [min-max]``."""
    backends = document["backends"]
    names = list(backends)
    rows = [["metric", "unit", *(backends[n]["label"] for n in names)]]
    for key, entry in document["metrics"].items():
        unit = entry["unit"]
        rows.append(
            [
                entry["label"],
                unit,
                *(
                    backends[n].get("unavailable", {}).get(key)
                    or cell(entry["results"].get(n), unit)
                    for n in names
                ),
            ]
        )
    if document["closure"]:
        closure = document["closure"]
        rows.append(
            [
                "W6 __main__ closure + helper",
                "runs?",
                *(
                    "-" if n not in closure else "yes" if closure[n]["ok"] else "no"
                    for n in names
                ),
            ]
        )
    return rows


#: dispynb on another engine beside that engine alone (issue 14 item 5): the row,
#: the raw engine's row, the engine's name.
ENGINE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("dispynb-dask", "dask", "Dask"),
    ("dispynb-ray", "ray", "Ray"),
)

#: Issue 14's overhead targets: metric, whether higher is better, the bound as a
#: fraction of the raw engine's median.
ENGINE_TARGETS: tuple[tuple[str, bool, float], ...] = (
    ("throughput", True, 0.9),
    ("latency_median", False, 1.1),
    ("bandwidth", True, 0.9),
)


def evaluate_engine_targets(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """dispynb-on-X against raw X, same run: W1 and W4 at least 0.9x, W2 at most
    1.1x. One entry per engine and metric with both medians (``engine``, ``metric``,
    ``label``, ``unit``, ``value``, ``raw``, ``ratio``, ``bound``, ``status``)."""
    entries: list[dict[str, Any]] = []
    for row, raw_row, engine in ENGINE_ROWS:
        for key, higher, bound in ENGINE_TARGETS:
            value = _median(document, key, row)
            raw = _median(document, key, raw_row)
            if value is None or raw is None or raw == 0:
                continue
            ratio = value / raw
            ok = ratio >= bound if higher else ratio <= bound
            metric = document["metrics"][key]
            entries.append(
                {
                    "engine": engine,
                    "metric": key,
                    "label": metric["label"],
                    "unit": metric["unit"],
                    "value": value,
                    "raw": raw,
                    "ratio": ratio,
                    "bound": f"{'>=' if higher else '<='} {bound:.1f}x",
                    "status": "PASS" if ok else "MISS",
                }
            )
    return entries


def format_table(document: Mapping[str, Any]) -> str:
    """Render the document as a text table, the targets and the failures."""
    if not document["backends"]:  # only the cross-host part was measured
        return "\n".join(crosshost_text(document)).strip("\n")
    rows = table_rows(document)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    for target in document["targets"]:
        value = number(target["value"], target["unit"])
        limit = number(target["limit"], target["unit"])
        lines.append(
            f"{target['status']:4}  {target['target']}: {SUBJECT} {value}"
            f" vs {limit} {target['unit']} ({target['reference']})"
        )
    cold = document["metrics"].get("bandwidth_cold", {}).get("results", {})
    for name, result in cold.items():
        runs = ", ".join(number(v, "MB/s") for v in result["runs"])
        lines.append(f"W4 cold per repetition, {name}: {runs} MB/s")
        starts = document["backends"].get(name, {}).get("cold_start", [])
        if starts:
            lines.append(f"  started after {_cold_starts(starts)}")
    shared = document["metrics"].get("shared_object", {}).get("results", {})
    for name, result in shared.items():
        runs = ", ".join(number(v, "s") for v in result["runs"])
        lines.append(f"W7 per repetition, {name}: {runs} s")
    for entry in evaluate_engine_targets(document):
        lines.append(
            f"{entry['status']:4}  dispynb on {entry['engine']}, {entry['label']}:"
            f" {entry['ratio']:.2f}x raw {entry['engine']} (target"
            f" {entry['bound']})"
        )
    for details in document["backends"].values():
        if "error" in details:
            last = details["error"].strip().splitlines()[-1]
            lines.append(f"{details['label']} FAILED: {last}")
        for workload, reason in details.get("unsupported", {}).items():
            lines.append(f"{details['label']}, {workload}: not supported ({reason})")
    lines += crosshost_text(document)
    repeat = document["config"].get("repeat")
    lines.append(
        f"Cells: median [min-max] of {repeat} repetition(s); memory measured once."
    )
    return "\n".join(line.rstrip() for line in lines)


def _cold_starts(starts: list[dict[str, Any]]) -> str:
    """Each W4 cold repetition's wait for quiet CPUs and their load then."""
    parts = []
    for start in starts:
        waited, busy = start.get("waited"), start.get("busy")
        if waited is None or busy is None:
            parts.append("no wait (load unknown)")
        else:
            parts.append(f"{waited:.1f} s, CPUs {busy:.0%} busy")
    return "; ".join(parts)


def write_report(document: Mapping[str, Any], directory: Path) -> Path:
    """Write ``document`` to ``directory/<UTC timestamp>.json``; return the path."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = directory / f"{stem}.json"
    suffix = 1
    while path.exists():  # two runs in the same second
        path = directory / f"{stem}-{suffix}.json"
        suffix += 1
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path
