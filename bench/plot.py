"""Draw ``docs/benchmark.png``, ``docs/scale.png`` and ``docs/crosshost.png`` and write
``docs/benchmarks.md``.

Usage: ``bench/.venvs/plot/bin/python bench/plot.py RESULTS.json [DOCS_DIR]``
(``run.py --report`` does this). matplotlib comes from the ``plot`` environment
(``venvs.py``), never from the project's. A run without any framework row (only
``--cross-host``) does not overwrite the report: its section and plot are spliced
into the existing one (``markdown.splice``).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
from markdown import render_markdown, splice
from matplotlib.ticker import FuncFormatter, NullFormatter
from report import SUBJECT

matplotlib.use("Agg")

#: Panels of the comparison plot: metric key, title, log scale.
PANELS = (
    ("throughput", "W1 throughput (jobs/s, higher is better)", True),
    ("latency_median", "W2 round trip, median (ms, lower is better)", True),
    ("cpu_efficiency", "W3 CPU-bound efficiency (higher is better)", False),
    ("bandwidth", "W4 bandwidth (MB/s, higher is better)", False),
    ("start_first_result", "W5 start to first result (s, lower is better)", True),
    ("mem_nodes_rest", "nodes/workers at rest (MiB, lower is better)", True),
)
SUBJECT_COLOR, OTHER_COLOR = "#d95f02", "#7570b3"


def plot_comparison(document: Mapping[str, Any], path: Path) -> None:
    """One bar chart per metric: median with min-max whiskers, dispynb highlighted."""
    names = list(document["backends"])
    labels = [
        document["backends"][n]["label"].replace("ProcessPoolExecutor", "PPE")
        for n in names
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (key, title, log) in zip(axes.flat, PANELS, strict=True):
        results = document["metrics"].get(key, {}).get("results", {})
        for i, name in enumerate(names):
            result = results.get(name)
            if result is None or (log and result["median"] <= 0):
                text = "n/a" if result is None else "0"
                ax.text(i, 0.02, text, ha="center", transform=ax.get_xaxis_transform())
                continue
            median = result["median"]
            error = [[median - result["min"]], [result["max"] - median]]
            color = SUBJECT_COLOR if name == SUBJECT else OTHER_COLOR
            ax.bar(i, median, color=color, yerr=error, capsize=4)
            text = f"{median:.2f}" if median < 10 else f"{median:,.0f}"
            ax.annotate(
                text,
                (i, median),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 3),
                textcoords="offset points",
            )
        if key == "cpu_efficiency":
            ax.axhline(0.95, color="black", linestyle="--", linewidth=0.8)
            ax.set_ylim(0, 1.1)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(names)), labels, rotation=30, ha="right", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    machine = document["machine"]
    fig.suptitle(
        f"dispynb vs peers, {machine.get('nproc')} CPUs, 2 workers each"
        f" (median of {document['config'].get('repeat')}, whiskers min-max)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scale(scale: Mapping[str, Any], path: Path) -> None:
    """jobs/s and CPU per job against node processes; bytes per queued job."""
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    nodes = scale.get("nodes") or []
    counts = [row["nodes"] for row in nodes]
    rate = [statistics.median(row["jobs_per_s"]) for row in nodes]
    ax1.plot(counts, rate, marker="o", color=SUBJECT_COLOR)
    ax1.set(
        xscale="log",
        xlabel="node processes (1 CPU each)",
        ylabel="jobs/s",
        title="Throughput vs node processes",
        ylim=(0, max(rate, default=1) * 1.2),
    )
    client = [statistics.median(row["client_cpu_us_per_job"]) for row in nodes]
    node_cpu = [statistics.median(row["nodes_cpu_us_per_job"]) for row in nodes]
    ax2.plot(counts, client, marker="o", label="client")
    ax2.plot(counts, node_cpu, marker="s", label="all nodes")
    ax2.set(
        xscale="log",
        xlabel="node processes (1 CPU each)",
        ylabel="CPU microseconds per job",
        title="Scheduling overhead per job",
        ylim=(0, max(client + node_cpu, default=1) * 1.2),
    )
    ax2.legend()
    queued = scale.get("queued") or []
    ax3.plot(
        [r["queued"] for r in queued],
        [r["bytes_per_job"] for r in queued],
        marker="o",
        color=SUBJECT_COLOR,
    )
    ax3.set(
        xscale="log",
        xlabel="jobs queued (submitted, not waited for)",
        ylabel="client bytes per pending job",
        title="Client memory per pending job",
        ylim=(0, max((r["bytes_per_job"] for r in queued), default=1) * 1.3),
    )
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    if counts:
        for ax in (ax1, ax2):
            ax.set_xticks(counts, [str(c) for c in counts])
            ax.minorticks_off()
    fig.suptitle("dispynb scale curve (2-CPU machine, loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_crosshost(crosshost: Mapping[str, Any], path: Path) -> None:
    """W1 jobs/s and W4 MB/s against node processes on 4 namespace hosts, with the
    raw TCP reference of the same run."""
    rows = crosshost.get("scale") or []
    counts = [row["nodes"] for row in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label, unit in (
        (ax1, "throughput", "W1 trivial jobs", "jobs/s"),
        (ax2, "bandwidth", "W4 10 MB arguments", "MB/s"),
    ):
        median = [statistics.median(row[key]) for row in rows]
        low = [m - min(row[key]) for m, row in zip(median, rows, strict=True)]
        high = [max(row[key]) - m for m, row in zip(median, rows, strict=True)]
        ax.errorbar(
            counts,
            median,
            yerr=[low, high],
            marker="o",
            capsize=4,
            color=SUBJECT_COLOR,
            label="dispynb",
        )
        top = max(median, default=1)
        raw = (crosshost.get("main") or {}).get("raw_tcp")
        if key == "bandwidth" and raw:
            reference = statistics.median(raw)
            ax.axhline(reference, color="black", linestyle="--", linewidth=0.8)
            ax.axhline(0.8 * reference, color="gray", linestyle=":", linewidth=0.8)
            ax.annotate(
                f"raw TCP {reference:,.0f} (dotted: 0.8x)",
                (counts[0] if counts else 1, reference),
                xytext=(0, 4),
                textcoords="offset points",
                fontsize=8,
            )
            top = max(top, reference)
        ax.set(
            xscale="log",
            xlabel="node processes (1 CPU each) on 4 hosts",
            ylabel=unit,
            title=f"{label} across hosts",
            ylim=(0, top * 1.2),
        )
        if counts:
            ax.set_xticks(counts, [str(c) for c in counts])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
    fig.suptitle(
        "dispynb across network-namespace hosts (veth + bridge, 2-CPU machine)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """Read the results JSON; write the PNGs and the markdown."""
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    document = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    docs = (
        Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "docs"
    )
    docs.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}
    if document.get("crosshost") and document["crosshost"].get("scale"):
        images["crosshost"] = "crosshost.png"
        plot_crosshost(document["crosshost"], docs / images["crosshost"])
    report = docs / "benchmarks.md"
    if not document["backends"] and report.exists():
        text = splice(
            report.read_text(encoding="utf-8"), document, images.get("crosshost")
        )
        report.write_text(text, encoding="utf-8")
        print(f"spliced into {report}: {', '.join(images.values()) or 'no plot'}")
        return 0
    images["comparison"] = "benchmark.png"
    plot_comparison(document, docs / images["comparison"])
    if document.get("scale") and document["scale"].get("nodes"):
        images["scale"] = "scale.png"
        plot_scale(document["scale"], docs / images["scale"])
    (docs / "benchmarks.md").write_text(
        render_markdown(document, images), encoding="utf-8"
    )
    print(f"wrote {docs / 'benchmarks.md'} and {', '.join(images.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
