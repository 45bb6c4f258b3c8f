"""Static HTML for runs, nodes and progress: small template functions.

The HTML of the core's own objects (a job, a cluster) and the table helpers live in
`dispynb.reprs`, which the core uses without the Jupyter layer; they are re-exported
here for the templates of this layer. Every function returns a self-contained HTML
fragment (inline styles, no scripts), so that it renders the same in JupyterLab,
Notebook 7, VS Code, nbviewer and GitHub, and survives in saved notebooks. Nothing
here imports IPython, ipywidgets or pandas.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from dispynb.reprs import (
    COLORS,
    TABLE_STYLE,
    cluster_html,
    details_html,
    format_bytes,
    format_load,
    job_html,
    short_repr,
    status_name,
    table_html,
)

if TYPE_CHECKING:
    from dispynb.job import DispyJob
    from dispynb.jupyter.progress import ProgressCounts
    from dispynb.jupyter.run import Run
    from dispynb.jupyter.widgets import NodeRow

__all__ = [
    "cluster_html",
    "format_bytes",
    "format_counts",
    "format_load",
    "format_seconds",
    "job_html",
    "nodes_html",
    "progress_html",
    "provisional_html",
    "run_html",
    "short_repr",
]


def format_seconds(seconds: float | None) -> str:
    """``'0:04'``, ``'1:02:03'``; ``'?'`` for None."""
    if seconds is None:
        return "?"
    seconds = max(round(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_counts(counts: ProgressCounts) -> str:
    """One line of text: ``'45/100 done, 2 failed, 4 running, 49 queued, ...'``."""
    parts = [f"{counts.finished}/{counts.total} done"]
    if counts.failed:
        parts.append(f"{counts.failed} failed")
    if counts.cancelled:
        parts.append(f"{counts.cancelled} cancelled")
    parts.append(f"{counts.running} running")
    parts.append(f"{counts.queued} queued")
    if counts.provisional:
        latest = f" (latest {counts.latest})" if counts.latest else ""
        parts.append(f"{counts.provisional} provisional{latest}")
    if counts.rate:
        parts.append(f"{counts.rate:.3g} jobs/s")
    if counts.complete:
        parts.append(f"in {format_seconds(counts.elapsed)}")
    elif counts.eta is not None:
        parts.append(f"ETA {format_seconds(counts.eta)}")
    return ", ".join(parts)


def progress_html(counts: ProgressCounts, title: str = "") -> str:
    """A stacked bar (finished, failed, cancelled, running) with the counts below."""
    total = max(counts.total, 1)
    segments = []
    for key in ("finished", "failed", "cancelled", "running"):
        width = 100.0 * getattr(counts, key) / total
        if width:
            segments.append(
                f'<div title="{key}" style="width:{width:.2f}%;'
                f'background:{COLORS[key]}"></div>'
            )
    label = html.escape(format_counts(counts))
    heading = f"<b>{html.escape(title)}</b> " if title else ""
    return (
        '<div class="dispynb-run-progress" style="max-width:40em">'
        f"<div>{heading}{label}</div>"
        '<div style="display:flex;height:0.8em;background:#e0e0e0;'
        f'border-radius:3px;overflow:hidden">{"".join(segments)}</div></div>'
    )


def run_html(run: Run) -> str:
    """A run: its progress, where it ran and its first failure's traceback."""
    if run.error is not None:
        return (
            f"<div class='dispynb-run'><b>Run {html.escape(run.name)}</b> not "
            f"started: <pre>{html.escape(run.error)}</pre></div>"
        )
    counts = run.counts()
    parts = [progress_html(counts, title=f"Run {run.name}")]
    if run.cut_short is not None:
        parts.append(
            f"<div>stopped while submitting, {html.escape(run.submitted())}: "
            f"<pre>{html.escape(run.cut_short)}</pre></div>"
        )
    nodes = run._nodes_ran_on()
    if nodes:
        parts.append(
            f"<div style='font-size:90%'>nodes: {html.escape(', '.join(nodes))}</div>"
        )
    provisional = run.provisional
    if provisional:
        parts.append(provisional_html(run.jobs, provisional))
    failures = run.failures
    if failures:
        first = failures[0]
        summary = (  # by input, as the cell's lines: the row of .df
            f"{len(failures)} failed; first: input {run._index.get(first.id)} (job "
            f"{first.id}){run._where_failed(first)}"
        )
        parts.append(details_html(summary, run.traceback(first)))
    parts.append(
        "<div style='font-size:80%;color:#757575'>results: <code>.results</code>, "
        "table: <code>.df</code></div>"
    )
    return f'<div class="dispynb-run">{"".join(parts)}</div>'


def provisional_html(
    jobs: Sequence[DispyJob], latest: dict[int, object], limit: int = 20
) -> str:
    """The latest provisional result of each job (by input index) that sent one,
    the unfinished jobs first, at most ``limit`` rows."""
    order = sorted(latest, key=lambda i: (jobs[i].done(), i))
    rows = [
        (
            str(index),
            html.escape(repr(jobs[index].id)),
            html.escape(status_name(jobs[index].status)),
            html.escape(short_repr(latest[index])),
        )
        for index in order[:limit]
    ]
    more = len(order) - len(rows)
    summary = f"latest provisional results of {len(order)} jobs"
    table = table_html(("input", "job", "status", "latest provisional"), rows)
    if more > 0:
        table += f"<div style='font-size:80%'>... and {more} more</div>"
    return f"<details open><summary>{html.escape(summary)}</summary>{table}</details>"


def nodes_html(rows: Iterable[NodeRow], live: bool = False) -> str:
    """The node panel's table (see `dispynb.jupyter.widgets.NodePanel`); nodes
    gone (left or replaced) are greyed. ``live``: for the panel's widget, redrawn
    as the nodes change, its cells styled once (`table_html`'s ``cell_style``)."""
    rows = list(rows)
    header = (
        "name", "address", "CPUs", "busy", "jobs ended", "CPU used", "memory free",
        "state",
    )  # fmt: skip
    body = [
        (
            html.escape(row.name),
            html.escape(row.address),
            str(row.cpus),
            str(row.busy),
            str(row.jobs_done),
            format_load(row.cpu_free),
            format_bytes(row.memory_free),
            row.state,
        )
        for row in rows
    ]
    if not body:
        return "<div class='dispynb-nodes'><i>no nodes yet</i></div>"
    greyed = [i for i, row in enumerate(rows) if row.gone]
    table = table_html(header, body, greyed, cell_style=not live)
    style = TABLE_STYLE if live else ""
    return f"<div class='dispynb-nodes'>{style}{table}</div>"
