"""Static HTML for runs, jobs, clusters, nodes and progress: small template functions.

Every function returns a self-contained HTML fragment (inline styles, no scripts), so
that it renders the same in JupyterLab, Notebook 7, VS Code, nbviewer and GitHub, and
survives in saved notebooks. Nothing here imports IPython, ipywidgets or pandas.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from dispynb.job import JobStatus

if TYPE_CHECKING:
    from dispynb.cluster import JobCluster
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

_COLORS = {
    "finished": "#2e7d32",
    "failed": "#c62828",
    "cancelled": "#9e9e9e",
    "running": "#64b5f6",
}
_STATUS_COLORS = {
    JobStatus.Finished: _COLORS["finished"],
    JobStatus.Terminated: _COLORS["failed"],
    JobStatus.Abandoned: _COLORS["failed"],
    JobStatus.Cancelled: _COLORS["cancelled"],
    JobStatus.Running: _COLORS["running"],
}
_TABLE = 'style="border-collapse:collapse;font-size:90%"'
_CELL = 'style="padding:1px 8px;text-align:left"'
_MAX_TEXT = 4000


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
                f'background:{_COLORS[key]}"></div>'
            )
    label = html.escape(format_counts(counts))
    heading = f"<b>{html.escape(title)}</b> " if title else ""
    return (
        '<div class="dispynb-progress" style="max-width:40em">'
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
    nodes = sorted({job.ip_addr for job in run.jobs if job.ip_addr})
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
        summary = f"{len(failures)} failed; first: job {first.id} on {first.ip_addr}"
        parts.append(_details(summary, run.traceback(first)))
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
            html.escape(_status_name(jobs[index].status)),
            html.escape(short_repr(latest[index])),
        )
        for index in order[:limit]
    ]
    more = len(order) - len(rows)
    summary = f"latest provisional results of {len(order)} jobs"
    table = _html_table(("input", "job", "status", "latest provisional"), rows)
    if more > 0:
        table += f"<div style='font-size:80%'>... and {more} more</div>"
    return f"<details open><summary>{html.escape(summary)}</summary>{table}</details>"


def job_html(job: DispyJob) -> str:
    """A job: id, status, node, times, and its output and traceback when present."""
    status = JobStatus(job.status)
    color = _STATUS_COLORS.get(status, "inherit")
    duration = (
        f"{job.end_time - job.start_time:.3f} s"
        if job.start_time is not None and job.end_time is not None
        else "-"
    )
    rows = [
        ("id", html.escape(repr(job.id))),
        ("status", f'<span style="color:{color}">{status.name}</span>'),
        ("node", html.escape(job.ip_addr or "-")),
        ("submitted", _clock(job.submit_time)),
        ("duration", duration),
    ]
    if status is JobStatus.Finished:
        rows.append(("result", html.escape(_short(repr(job.result)))))
    parts = [_html_table(None, rows)]
    for name in ("stdout", "stderr"):
        text = getattr(job, name)
        if text:
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            parts.append(_details(name, text))
    if job.exception:
        parts.append(_details("exception", job.exception, open_=True))
    return f'<div class="dispynb-job">{"".join(parts)}</div>'


def cluster_html(cluster: JobCluster) -> str:
    """A cluster: its computation, its nodes and its pending jobs."""
    status = cluster.status()
    title = (
        f"<b>JobCluster {html.escape(repr(cluster.name))}</b>: "
        f"{len(status.nodes)} nodes, {status.jobs_pending} jobs pending"
    )
    header = (
        "name", "address", "CPUs", "busy", "jobs done", "CPU time", "CPU used",
        "memory free",
    )  # fmt: skip
    rows = [
        (
            html.escape(n.name),
            html.escape(f"{n.ip_addr}:{n.port}"),
            str(n.cpus),
            str(n.busy),
            str(n.jobs_done),
            f"{n.cpu_time:.2f} s",
            format_load(n.avail_info.cpu if n.avail_info else None),
            format_bytes(n.avail_info.memory if n.avail_info else None),
        )
        for n in status.nodes
    ]
    return f'<div class="dispynb-cluster">{title}{_html_table(header, rows)}</div>'


def nodes_html(rows: Iterable[NodeRow]) -> str:
    """The node panel's table (see `dispynb.jupyter.widgets.NodePanel`); nodes
    gone (left or replaced) are greyed."""
    rows = list(rows)
    header = (
        "name", "address", "CPUs", "busy", "jobs done", "CPU used", "memory free",
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
    return f"<div class='dispynb-nodes'>{_html_table(header, body, greyed)}</div>"


def format_load(cpu_free: float | None) -> str:
    """``'37%'`` of CPU used, from the percentage available; ``'-'`` if unknown."""
    if cpu_free is None:
        return "-"
    return f"{min(max(100.0 - cpu_free, 0.0), 100.0):.0f}%"


def format_bytes(count: float | None) -> str:
    """``'3.2 GB'``; ``'-'`` if unknown."""
    if count is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GB"


def short_repr(value: object, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters (never raises)."""
    try:
        text = repr(value)
    except Exception as exc:  # a user object whose repr fails
        text = f"<unprintable {type(value).__name__}: {exc!r}>"
    return _short(text, limit)


def _status_name(status: object) -> str:
    try:
        return JobStatus(status).name  # type: ignore[arg-type]
    except ValueError:
        return str(status)


def _html_table(
    head: Sequence[str] | None,
    rows: Sequence[Sequence[str]],
    greyed: Sequence[int] = (),
) -> str:
    lines = [f"<table {_TABLE}>"]
    if head is not None:
        cells = "".join(f"<th {_CELL}>{h}</th>" for h in head)
        lines.append(f"<thead><tr>{cells}</tr></thead>")
    lines.append("<tbody>")
    for index, row in enumerate(rows):
        cells = "".join(f"<td {_CELL}>{c}</td>" for c in row)
        grey = " class='dispynb-gone' style='opacity:0.45'" if index in greyed else ""
        lines.append(f"<tr{grey}>{cells}</tr>")
    lines.append("</tbody></table>")
    return "".join(lines)


def _details(summary: str, text: str, open_: bool = False) -> str:
    if len(text) > _MAX_TEXT:
        text = text[:_MAX_TEXT] + f"\n... ({len(text) - _MAX_TEXT} more characters)"
    attr = " open" if open_ else ""
    return (
        f"<details{attr}><summary>{html.escape(summary)}</summary>"
        f'<pre style="font-size:85%;white-space:pre-wrap">{html.escape(text)}</pre>'
        "</details>"
    )


def _clock(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(epoch))


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
