"""The nodes a `Session` uses: which they are (`known_nodes`), their rows in the
node panel, whether the local ones it started still run (`exited_error`), and
choosing some of them for a run (``%%dispy --on``: `select_nodes`)."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError

from dispynb.backends.base import SELECT_NODES, Engine
from dispynb.jupyter.errors import MagicError
from dispynb.jupyter.sessionstatus import launcher_kind
from dispynb.jupyter.widgets import LOAD_INTERVAL, NodePanel


class _SessionNodes:
    """A `Session`'s nodes in use (see `dispynb.jupyter.session`)."""

    # Set by `Session.__init__` (see there).
    local: Any
    nodes: Any
    engine: Engine | None
    options: dict[str, Any]
    panel: NodePanel

    def _show_in_use(self) -> None:
        """The panel keeps the nodes in use; others show as gone, then go. It
        shows their load as often as ``--pulse`` asked them to report it."""
        self.panel.load_interval = self.options.get("pulse_interval") or LOAD_INTERVAL
        self.panel.in_use([address for _, address, _ in self.known_nodes()])

    def rows(self) -> list[Any]:
        """The panel's rows, local nodes whose process exited marked gone (also
        one that exited before the session's probe met it)."""
        exited = sorted(self.exited_nodes())
        if exited:
            names = {address: name for _, address, name in self.known_nodes()}
            self.panel.table.mark_gone(exited, names)
        return self.panel.rows()

    def exited_nodes(self) -> set[str]:
        """``"host:port"`` of the nodes this session started whose process exited
        (a launched node that ended before it registered has none)."""
        firsts = (item.split(" ", 1)[0] for item in self._exited_items())
        return {first for first in firsts if _is_address(first)}

    def _exited_items(self) -> list[str]:
        """``"host:port (status N)"`` of each local node this session started that
        has exited; a launcher's (SSH, SLURM) say ``"host:port (name: why)"``."""
        if self.local is None or self.nodes is not self.local:
            return []
        return list(self.local.exited())

    def header(self) -> dict[str, Any]:
        """What the lab panel's header says ``%dispy`` uses: ``{"kind": "local" |
        "ssh" | "slurm" | "nodes", "nodes": ["host:port", ...]}``: the nodes named
        as the cell that started them says them (``dispynb: ssh nodes ...``, as
        ``%dispy status``), "nodes" those given by ``%dispy nodes``. Each node this
        session started that exited is marked ``(exited)``: the next cell will not
        run on it. A launcher's (SSH, SLURM), which `known_nodes` no longer lists,
        come last (they vanished from the header, as if never started)."""
        started = self.local is not None and self.nodes is self.local
        exited = self.exited_nodes()
        listed = [address for _, address, _ in self.known_nodes()]
        listed += sorted(exited.difference(listed))
        return {
            "kind": launcher_kind(self.local) if started else "nodes",
            "nodes": [f"{a} (exited)" if a in exited else a for a in listed],
        }

    def known_nodes(self) -> list[tuple[str, str, str]]:
        """``(host, "host:port", name)`` of each node in use (name "" if unknown)."""
        from dispynb.defaults import NODE_PORT
        from dispynb.node import parse_node_specs

        if self.engine is not None:  # its workers, as the panel saw them
            return [
                (row.address.rsplit(":", 1)[0], row.address, row.name)
                for row in self.panel.rows()
            ]
        if self.nodes is None:
            return []
        # The names the launcher gave its nodes (a LocalCluster's), for those not
        # heard yet: the panel learns a node's name only once it answers.
        given: dict[tuple[str, int], str] = {}
        if self.local is not None and self.nodes is self.local:
            pairs = list(self.local.addresses)
            given = dict(zip(pairs, getattr(self.local, "names", ()), strict=False))
        else:
            pairs = [
                (spec.host, spec.port or NODE_PORT)
                for spec in parse_node_specs(self.nodes)
            ]
        names = {row.address: row.name for row in self.panel.rows()}
        return [
            (
                host,
                f"{host}:{port}",
                names.get(f"{host}:{port}") or given.get((host, port), ""),
            )
            for host, port in pairs
        ]

    def select_nodes(self, wanted: list[str]) -> tuple[list[str], dict[str, Any]]:
        """The node specs and cluster options for running on ``wanted`` only.

        Each item is a node's ``HOST:PORT``, its host, or its name, and must match
        exactly one node in use. Raises `UsageError` naming the nodes in use.
        """
        if self.engine is not None and SELECT_NODES not in self.engine.features:
            raise UsageError(
                f"--on is for dispynb's node servers and engines that select "
                f"workers: the {self.engine.name} engine uses every worker of its "
                "cluster"
            )
        known = self.known_nodes()
        listing = ", ".join(
            f"{name} ({address})" if name else address for _, address, name in known
        )
        specs = {address: _spec(host, address) for host, address, _ in known}
        chosen: list[str] = []
        for item in wanted:
            item = item.strip()
            matches = [a for _, a, _ in known if a == item or a == _bracketless(item)]
            if not matches:
                matches = [a for host, a, name in known if item in (host, name)]
            if not matches:
                raise UsageError(
                    f"--on {item}: not a node in use; the nodes are: "
                    f"{listing or 'none'}"
                )
            if len(matches) > 1:
                raise UsageError(
                    f"--on {item} matches {len(matches)} nodes ({', '.join(matches)}):"
                    f" give HOST:PORT or the node's name; the nodes are: {listing}"
                )
            exited = [e for e in self._exited_items() if e.startswith(matches[0] + " ")]
            if exited:
                raise UsageError(
                    f"--on {item}: node {exited[0]} has exited; the nodes are: "
                    f"{listing} (run %dispy {launcher_kind(self.local)} again for "
                    "new nodes)"
                )
            if specs[matches[0]] not in chosen:
                chosen.append(specs[matches[0]])
        options = dict(self.options)
        if self.local is not None and self.nodes is self.local and self.local.secret:
            options.setdefault("secret", self.local.secret)
        return chosen, options

    def exited_error(self) -> MagicError | None:
        """The error saying that every node this session started has exited
        (None while one runs, or if it started none): a cell has none to run on."""
        gone, running = self._exited_and_running()
        if not gone or running:
            return None
        kind = launcher_kind(self.local)
        return MagicError(
            f"the {kind} nodes have exited: {', '.join(gone)}; no job was sent: "
            f"start new ones with %dispy {kind}"
        )

    def exited_news(self) -> str:
        """Which of the nodes this session started have exited while others run
        ("" if none has): a cell runs on the others, as a dispy cluster goes on
        with the nodes it has, and says so."""
        gone, running = self._exited_and_running()
        if not gone or not running:
            return ""
        kind = launcher_kind(self.local)
        verb = "has" if len(gone) == 1 else "have"
        return (
            f"{len(gone)} of the {len(gone) + running} {kind} nodes {verb} exited: "
            f"{', '.join(gone)}; running on the other {running}: run %dispy {kind} "
            "again for new nodes"
        )

    def _exited_and_running(self) -> tuple[list[str], int]:
        """The nodes this session started that exited (as ``exited()`` says them),
        and how many still run. A `LocalCluster`'s ``addresses`` name all it
        started; a launcher's (SSH, SLURM) only those still running."""
        if self.local is None or self.nodes is not self.local:
            return [], 0
        gone = list(self.local.exited())
        from dispynb.deploy.base import NodeLauncher

        if isinstance(self.local, NodeLauncher):
            return gone, len(self.local.nodes)
        return gone, len(self.local.addresses) - len(gone)


def _spec(host: str, address: str) -> str:
    """The node spec for ``address`` (``host:port``), bracketing IPv6 hosts."""
    return f"[{host}]{address[len(host) :]}" if ":" in host else address


def _is_address(text: str) -> bool:
    """Whether ``text`` is a ``host:port`` (not a launched node's bare name)."""
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit()


def _bracketless(address: str) -> str:
    """``'::1:9711'`` for ``'[::1]:9711'`` (the panel's form of IPv6 addresses)."""
    if address.startswith("[") and "]:" in address:
        host, port = address[1:].split("]:", 1)
        return f"{host}:{port}"
    return address
