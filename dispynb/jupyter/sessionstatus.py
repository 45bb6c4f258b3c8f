"""What ``%dispy status`` shows of a `Session`: its nodes (or engine) and its
runs, as text or HTML (`SessionStatus`), and what started its nodes
(`launcher_kind`)."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from dispynb.jupyter import display as templates

if TYPE_CHECKING:
    from dispynb.jupyter.session import Session

__all__ = ["SessionStatus", "launcher_kind"]


def launcher_kind(nodes: Any) -> str:
    """``'local'``, ``'ssh'``, ``'slurm'``: what started a session's nodes."""
    return str(getattr(nodes, "kind", "local"))


class SessionStatus:
    """What ``%dispy status`` returns: the nodes and the runs, as text or HTML."""

    def __init__(self, session: Session) -> None:
        self.nodes = session.nodes
        self.engine = session.engine
        self.engine_label = session.engine_label
        self.rows = session.rows()
        self.runs = list(session.runs)

    def _where(self) -> str:
        if self.engine is not None:
            return f"{self.engine.name} engine: {self.engine_label}"
        if self.nodes is None:
            return "no nodes: use %dispy local or %dispy nodes HOST ..."
        from dispynb.deploy.base import NodeLauncher

        if isinstance(self.nodes, NodeLauncher):
            # The nodes registered now (node_specs would wait for nodes starting,
            # raise without any, and under adapt launch one).
            specs = [node.spec for node in self.nodes.nodes]
            if not specs:
                return f"{self.nodes.kind} nodes: none registered"
            return f"{self.nodes.kind} nodes {', '.join(specs)}"
        if hasattr(self.nodes, "node_specs"):  # a LocalCluster
            kind = launcher_kind(self.nodes)
            return f"{kind} nodes {', '.join(self.nodes.node_specs())}"
        return f"nodes {', '.join(self.nodes)}"

    def __repr__(self) -> str:
        lines = [self._where()]
        for row in self.rows:
            lines.append(
                f"  {row.name or '?'} {row.address} {row.state} cpus={row.cpus} "
                f"busy={row.busy} jobs_done={row.jobs_done} "
                f"cpu_used={templates.format_load(row.cpu_free)} "
                f"memory_free={templates.format_bytes(row.memory_free)}"
            )
        lines.append(f"{len(self.runs)} run{'s' * (len(self.runs) != 1)}")
        lines += [f"  {run!r}" for run in self.runs]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        parts = [f"<div>{html.escape(self._where())}</div>"]
        parts.append(templates.nodes_html(self.rows))
        parts += [templates.progress_html(r.counts(), r.name) for r in self.runs]
        return f"<div class='dispynb-session-status'>{''.join(parts)}</div>"
