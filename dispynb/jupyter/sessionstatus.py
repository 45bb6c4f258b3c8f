"""What ``%dispy status`` shows of a `Session`: its nodes (or engine) and its
runs, as text or HTML (`SessionStatus`), and what started its nodes
(`launcher_kind`)."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from dispynb.jupyter import display as templates

if TYPE_CHECKING:
    from dispynb.jupyter.session import Session

__all__ = ["SessionStatus", "launcher_kind", "where_line"]


def launcher_kind(nodes: Any) -> str:
    """``'local'``, ``'ssh'``, ``'slurm'``: what started a session's nodes."""
    return str(getattr(nodes, "kind", "local"))


class SessionStatus:
    """What ``%dispy status`` returns: the nodes and the runs as they were when it
    ran, as text or HTML.

    A snapshot: it keeps no run (nor nodes). The notebook keeps what a cell returned
    (``Out``, ``_``), and a status that held its runs kept every run it listed in
    memory, with its results, and in each later ``%dispy status``, after the cell
    that made it was run again (which lets go of its earlier run)."""

    def __init__(self, session: Session) -> None:
        self.where = where_line(session)
        # No nodes in use (``%dispy close``): none listed, not the closed ones as
        # gone under "no nodes" (the panel keeps them, saying that it stopped them).
        in_use = session.nodes is not None or session.engine is not None
        self.rows = session.rows() if in_use else []
        runs = session.runs
        #: Each run as its repr says it, and its counts and name (for the HTML).
        self.runs = [repr(run) for run in runs]
        self._progress = [(run.counts(), run.name) for run in runs]

    def __repr__(self) -> str:
        lines = [self.where]
        for row in self.rows:
            lines.append(
                f"  {row.name or '?'} {row.address} {row.state} cpus={row.cpus} "
                f"busy={row.busy} jobs_done={row.jobs_done} "
                f"cpu_used={templates.format_load(row.cpu_free)} "
                f"memory_free={templates.format_bytes(row.memory_free)}"
            )
        lines.append(f"{len(self.runs)} run{'s' * (len(self.runs) != 1)}")
        lines += [f"  {run}" for run in self.runs]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        parts = [f"<div>{html.escape(self.where)}</div>"]
        parts.append(templates.nodes_html(self.rows))
        parts += [templates.progress_html(*run) for run in self._progress]
        return f"<div class='dispynb-session-status'>{''.join(parts)}</div>"


def where_line(session: Session) -> str:
    """The nodes (or engine) ``session`` uses, in a line."""
    nodes = session.nodes
    if session.engine is not None:
        return f"{session.engine.name} engine: {session.engine_label}"
    if nodes is None:
        return "no nodes: use %dispy local or %dispy nodes HOST ..."
    from dispynb.deploy.base import NodeLauncher

    if isinstance(nodes, NodeLauncher):
        # The nodes registered now (node_specs would wait for nodes starting,
        # raise without any, and under adapt launch one).
        specs = [node.spec for node in nodes.nodes]
        if not specs:
            return f"{nodes.kind} nodes: none registered"
        return f"{nodes.kind} nodes {', '.join(specs)}"
    if hasattr(nodes, "node_specs"):  # a LocalCluster
        if getattr(nodes, "closed", False):  # node_specs() raises, for clusters
            return f"{launcher_kind(nodes)} nodes: closed"
        return f"{launcher_kind(nodes)} nodes {', '.join(nodes.node_specs())}"
    return f"nodes {', '.join(nodes)}"
