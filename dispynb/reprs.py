"""Static HTML of the core's own objects: a job and a cluster (``_repr_html_``).

Every function returns a self-contained HTML fragment (inline styles, no scripts), so
that it renders the same in JupyterLab, Notebook 7, VS Code, nbviewer and GitHub, and
survives in saved notebooks. This module belongs to the core: it imports nothing of
the Jupyter layer (which builds its runs, progress bars and panels from the table
helpers here, see `dispynb.jupyter.display`), nor IPython, ipywidgets or pandas.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dispynb.job import JobStatus
from dispynb.transport.addressing import format_address
from dispynb.wording import format_bytes

if TYPE_CHECKING:
    from dispynb.cluster import JobCluster
    from dispynb.job import DispyJob

__all__ = [
    "COLORS",
    "TABLE_STYLE",
    "cluster_html",
    "details_html",
    "format_bytes",
    "format_load",
    "job_html",
    "short_repr",
    "status_name",
    "table_html",
]

#: Colours of the job outcomes, shared by job displays and progress bars.
COLORS = {
    "finished": "#2e7d32",
    "failed": "#c62828",
    "cancelled": "#9e9e9e",
    "running": "#64b5f6",
}
_STATUS_COLORS = {
    JobStatus.Finished: COLORS["finished"],
    JobStatus.Terminated: COLORS["failed"],
    JobStatus.Abandoned: COLORS["failed"],
    JobStatus.Cancelled: COLORS["cancelled"],
    JobStatus.Running: COLORS["running"],
}
_TABLE = 'style="border-collapse:collapse;font-size:90%"'
_CELL = 'style="padding:1px 8px;text-align:left"'
#: The style of the cells of a table made without ``cell_style`` (`table_html`).
TABLE_STYLE = (
    "<style>.dispynb-table th,.dispynb-table td"
    "{padding:1px 8px;text-align:left}</style>"
)
_MAX_TEXT = 4000


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
        ("node", html.escape(_node_label(job))),
        ("submitted", _clock(job.submit_time)),
        ("duration", duration),
    ]
    if status is JobStatus.Finished:
        rows.append(("result", html.escape(short_repr(job.result))))
    parts = [table_html(None, rows)]
    for name in ("stdout", "stderr"):
        text = getattr(job, name)
        if text:
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            parts.append(details_html(name, text))
    if job.exception:
        parts.append(details_html("exception", job.exception, open_=True))
    return f'<div class="dispynb-job">{"".join(parts)}</div>'


def _node_label(job: DispyJob) -> str:
    """``'local-1 (127.0.0.1:40331)'``: the node ``job`` ran on, named as
    ``print_status`` names it, with its port (nodes of one address, as %dispy
    local's, differ by name and port); its address alone if the cluster did not
    say which node, ``'-'`` if none."""
    node = getattr(job, "_node", None)  # unset until the job starts or ends
    if node is None or node.ip_addr != job.ip_addr:  # not where it is now (requeued)
        return job.ip_addr or "-"
    address = format_address(node.ip_addr, node.port)
    return f"{node.name} ({address})" if node.name else address


def cluster_html(cluster: JobCluster) -> str:
    """A cluster: its computation, its nodes and its pending jobs."""
    status = cluster.status()
    title = (
        f"<b>JobCluster {html.escape(repr(cluster.name))}</b>: "
        f"{len(status.nodes)} nodes, {status.jobs_pending} jobs pending"
    )
    header = (
        "name", "address", "CPUs", "busy", "jobs ended", "CPU time", "CPU used",
        "memory free",
    )  # fmt: skip
    rows = [
        (
            html.escape(n.name),
            html.escape(format_address(n.ip_addr, n.port)),
            str(n.cpus),
            str(n.busy),
            str(n.jobs_done),
            f"{n.cpu_time:.2f} s",
            format_load(n.avail_info.cpu if n.avail_info else None),
            format_bytes(n.avail_info.memory if n.avail_info else None),
        )
        for n in status.nodes
    ]
    return f'<div class="dispynb-cluster">{title}{table_html(header, rows)}</div>'


def format_load(cpu_free: float | None) -> str:
    """``'37%'`` of CPU used, from the percentage available; ``'-'`` if unknown."""
    if cpu_free is None:
        return "-"
    return f"{min(max(100.0 - cpu_free, 0.0), 100.0):.0f}%"


def short_repr(value: object, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters (never raises)."""
    try:
        text = repr(value)
    except Exception as exc:  # a user object whose repr fails
        text = f"<unprintable {type(value).__name__}: {exc!r}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def status_name(status: object) -> str:
    """The name of a job status (``'Finished'``), or ``str(status)`` if unknown."""
    try:
        return JobStatus(status).name  # type: ignore[arg-type]
    except ValueError:
        return str(status)


def table_html(
    head: Sequence[str] | None,
    rows: Sequence[Sequence[str]],
    greyed: Sequence[int] = (),
    cell_style: bool = True,
) -> str:
    """A compact table of HTML cells (escaped by the caller); rows whose index is
    in ``greyed`` are faded (gone nodes). Without ``cell_style`` no cell carries
    its own style: the table's ``dispynb-table`` class is styled by `TABLE_STYLE`,
    given once before it (a live widget redrawn every second: a third of the
    bytes), which front ends that strip ``<style>`` (saved notebooks on GitHub)
    do not apply."""
    cell = f" {_CELL}" if cell_style else ""
    lines = [
        f"<table {_TABLE}>" if cell_style else f"<table class='dispynb-table' {_TABLE}>"
    ]
    if head is not None:
        cells = "".join(f"<th{cell}>{h}</th>" for h in head)
        lines.append(f"<thead><tr>{cells}</tr></thead>")
    lines.append("<tbody>")
    for index, row in enumerate(rows):
        cells = "".join(f"<td{cell}>{c}</td>" for c in row)
        grey = " class='dispynb-gone' style='opacity:0.45'" if index in greyed else ""
        lines.append(f"<tr{grey}>{cells}</tr>")
    lines.append("</tbody></table>")
    return "".join(lines)


def details_html(summary: str, text: str, open_: bool = False) -> str:
    """A collapsible block of preformatted ``text`` (cut past a few thousand
    characters), titled ``summary``."""
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
