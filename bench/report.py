"""The benchmark report: the JSON document, the printed table and machine info.

Contents
--------
machine_info
    nproc, Python, platform, memory and commit of the machine running the benchmark.
build_report
    Turn the raw repetitions into the JSON document (the single source of the table).
format_table
    Render the JSON document as the side-by-side text table.
write_report
    Write the JSON document to ``<directory>/<UTC timestamp>.json``.
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
from pathlib import Path
from typing import Any

from workloads import Metric

__all__ = ["build_report", "format_table", "machine_info", "write_report"]

#: The backend checked against the targets, and the one it is compared with.
SUBJECT, BASELINE = "dispynb", "ppe"

#: Bumped when the JSON layout changes incompatibly.
SCHEMA_VERSION = 1


def machine_info() -> dict[str, Any]:
    """Describe the machine and the interpreter running the benchmark."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "memory_bytes": None,
        "commit": _git_commit(),
    }
    try:
        import psutil

        info["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    return info


def _git_commit() -> str | None:
    """The checked-out commit of this repository, if git is available."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def build_report(
    *,
    metrics: Sequence[Metric],
    runs: Mapping[str, Mapping[str, list[float]]],
    backends: Mapping[str, Mapping[str, Any]],
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """Assemble the JSON document.

    Parameters
    ----------
    metrics:
        The metrics measured, in display order.
    runs:
        ``runs[metric.key][backend_name]``: the value of each repetition.
    backends:
        ``backends[name]``: the backend's label and ``describe()`` details.
    config:
        Workers, repetitions, sizes.

    Returns
    -------
    dict
        JSON-serializable; ``metrics[key]["results"][backend]`` has ``runs``,
        ``median`` and ``best``; ``ratio`` is dispynb's median over PPE's and
        ``status`` is ``"PASS"``/``"MISS"`` for dispynb's median against the target.
    """
    document: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "config": dict(config),
        "backends": {name: dict(details) for name, details in backends.items()},
        "metrics": {},
    }
    for metric in metrics:
        results = {
            name: {
                "runs": values,
                "median": statistics.median(values),
                "best": metric.best(values),
            }
            for name, values in runs[metric.key].items()
        }
        subject = results.get(SUBJECT)
        baseline = results.get(BASELINE)
        document["metrics"][metric.key] = {
            "label": metric.label,
            "unit": metric.unit,
            "higher_is_better": metric.higher_is_better,
            "target": metric.target,
            "results": results,
            "ratio": subject["median"] / baseline["median"]
            if subject and baseline and baseline["median"]
            else None,
            "status": _status(metric, subject["median"]) if subject else None,
        }
    return document


def _status(metric: Metric, value: float) -> str | None:
    if metric.target is None:
        return None
    return "PASS" if metric.meets(value) else "MISS"


def format_table(document: Mapping[str, Any]) -> str:
    """Render the JSON document as a text table with notes below it."""
    backends: Mapping[str, Mapping[str, Any]] = document["backends"]
    names = list(backends)
    header = [
        "workload",
        "unit",
        *(backends[name]["label"] for name in names),
        f"{SUBJECT}/PPE",
        "target",
        "vs target",
    ]
    rows = [header]
    for entry in document["metrics"].values():
        unit = entry["unit"]
        cells = [entry["label"], unit]
        for name in names:
            cells.append(_cell(entry["results"].get(name), unit))
        direction = "higher" if entry["higher_is_better"] else "lower"
        ratio = entry["ratio"]
        cells.append(
            f"{ratio:.2f}x ({direction} is better)" if ratio is not None else "-"
        )
        target = entry["target"]
        sign = ">=" if entry["higher_is_better"] else "<="
        cells.append(f"{sign} {_number(target, unit)}" if target is not None else "-")
        cells.append(entry["status"] or "-")
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.extend(_notes(document))
    return "\n".join(line.rstrip() for line in lines)


def _notes(document: Mapping[str, Any]) -> list[str]:
    """Explain the cells: what is compared with what, on which machine."""
    config = document["config"]
    machine = document["machine"]
    repeat = config["repeat"]
    notes = [
        f"Cells: median of {repeat} repetition{'s' if repeat > 1 else ''} (best in"
        " brackets); one untimed warm-up round first.",
        f"{SUBJECT}/PPE: ratio of the medians. Target: issue 2, checked against"
        f" {SUBJECT}'s median.",
    ]
    for name, details in document["backends"].items():
        notes.append(f"{details['label']}: {_describe(name, details)}")
    notes.append(
        f"Machine: {machine['nproc']} CPUs, Python {machine['python']},"
        f" {machine['platform']}"
    )
    return notes


def _describe(name: str, details: Mapping[str, Any]) -> str:
    if name == "ppe":
        return (
            f"max_workers={details['max_workers']},"
            f" start method {details['start_method']!r}"
        )
    if name == "dispynb":
        return (
            f"{details['nodes']} LocalCluster node with {details['cpus']} CPUs,"
            f" version {details['version']}"
        )
    return ", ".join(f"{k}={v}" for k, v in details.items() if k != "label")


def _cell(result: Mapping[str, Any] | None, unit: str) -> str:
    """``median (best X)`` of one backend, or ``-`` if it did not run."""
    if result is None:
        return "-"
    return f"{_number(result['median'], unit)} (best {_number(result['best'], unit)})"


def _number(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.3f}"
    return f"{value:,.0f}"


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
