"""``%dispy`` and ``%%dispy``: choose nodes, and run a cell's function over inputs.

Load with ``%load_ext dispynb``. A `Session` (one per IPython shell) remembers the
nodes (local ones it started, or ones it attached to), every run, and a node panel.
Arguments are parsed with `IPython.core.magic_arguments`; the only text ever evaluated
is the documented ``--over`` expression, in the user's namespace.
"""

from __future__ import annotations

import ast
import atexit
import html
import os
import sys
from collections.abc import Callable
from typing import Any, cast

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display

from dispynb.backends.base import SELECT_NODES, Engine
from dispynb.cluster import ClusterFactory, new_cluster
from dispynb.defaults import LOCAL_ENGINE_ENV
from dispynb.jupyter import display as templates
from dispynb.jupyter.errors import MagicError, RunInterrupted
from dispynb.jupyter.magicsupport import cell_origin, friendly_errors, parse_line
from dispynb.jupyter.progress import KINDS, make_progress, resolve_kind
from dispynb.jupyter.run import Run
from dispynb.jupyter.widgets import NodePanel

__all__ = ["DispyMagics", "Session"]

# ``cell_magic("name")`` returns a decorator, but IPython types it as a union.
_cell_magic_named = cast(
    Callable[[str], Callable[[Callable[..., Any]], Callable[..., Any]]], cell_magic
)

#: Name that always holds the last run of ``%%dispy`` (like ``_`` for results).
LAST_RUN = "_dispy"


#: What to do when no node can be used, the end of every such error.
NODES_HINT = (
    "start nodes on this machine with %dispy local, or use running ones with "
    "%dispy nodes HOST[:PORT] ... (see %dispy?)"
)


#: ``%dispy ssh/slurm --adapt MIN:MAX``: (minimum, maximum, idle timeout).
Adapt = tuple[int, int, float]


def adapt_bounds(text: str, args: Any) -> Adapt:
    """``'MIN:MAX'`` (and ``--idle-timeout``) as `Adapt`; UsageError if malformed."""
    low, sep, high = text.partition(":")
    try:
        minimum, maximum = int(low), int(high)
    except ValueError:
        minimum = maximum = -1
    if not sep or minimum < 0 or maximum < max(minimum, 1):
        raise UsageError(
            f"--adapt takes MIN:MAX, two node counts with 0 <= MIN <= MAX and MAX >= 1 "
            f"(such as 0:4), not {text!r}"
        )
    if args.idle_timeout < 0:
        raise UsageError("--idle-timeout must be >= 0 seconds")
    return minimum, maximum, float(args.idle_timeout)


class Session:
    """The nodes a notebook uses, the runs it started and their node panel.

    Its runs' clusters come from ``cluster_factory`` (`dispynb.cluster.new_cluster`)
    with ``nodes``, ``engine`` and ``options``: an ``%dispy`` action for another
    engine only builds its `Engine` and calls `use_engine`.
    """

    def __init__(self) -> None:
        self.local: Any = None  # a LocalCluster this session started
        self.nodes: Any = None  # what the cluster's nodes= gets
        self.engine: Engine | None = None  # what runs the jobs (None: node servers)
        self.engine_label = ""  # where the engine runs, for %dispy status
        self.options: dict[str, Any] = {}
        self.cluster_factory: ClusterFactory = new_cluster
        self.runs: list[Run] = []
        self.panel = NodePanel()
        self._atexit = False

    @property
    def attached(self) -> bool:
        return self.nodes is not None or self.engine is not None

    def use_engine(
        self,
        engine: Engine,
        label: str,
        options: dict[str, Any] | None = None,
        *,
        hint: str = "",
    ) -> None:
        """Run on ``engine`` from now on (replacing the current nodes), after
        checking that it can set a computation up.

        ``label`` says where it runs (``%dispy status`` shows ``"{engine.name}
        engine: {label}"``); ``options`` are cluster options for every run; ``hint``
        ends the error when the check fails. The session closes the engine (its
        ``close()``, if it has one) when it lets it go.
        """
        self.close()
        self.engine, self.engine_label = engine, label
        self.options = dict(options or {})
        try:
            with friendly_errors(
                f"%dispy: cannot use the {engine.name} engine ({label})", hint=hint
            ):
                self.probe()
        except BaseException:
            self.close()
            raise
        self._show_in_use()

    def start_local(
        self,
        count: int,
        cpus: int | None,
        options: dict[str, Any] | None = None,
        engine: str | None = None,
    ) -> None:
        """Start ``count`` local node servers (replacing the current nodes).

        ``engine="dask"`` (default: ``$DISPYNB_LOCAL_ENGINE``, else dispynb's own
        nodes) starts a Dask ``LocalCluster`` instead, ``count`` worker processes
        of ``cpus`` threads each, and runs on it through the Dask engine.
        """
        from dispynb.local import LocalCluster

        engine = engine or os.environ.get(LOCAL_ENGINE_ENV) or "nodes"
        if engine == "dask":
            self.start_local_dask(count, cpus)
            return
        if engine != "nodes":
            raise UsageError(
                f"{LOCAL_ENGINE_ENV}={engine}: use 'nodes' (dispynb's node servers) "
                "or 'dask'"
            )
        self.close()
        with friendly_errors("%dispy local could not start the nodes", hint=""):
            self.local = LocalCluster(nodes=count, cpus=cpus)
        self.nodes = self.local
        self.options = dict(options or {})
        self._register_atexit()
        with friendly_errors("the local nodes did not answer", hint=""):
            self.probe()
        self._show_in_use()

    def start_local_dask(self, count: int, cpus: int | None) -> None:
        """A Dask cluster on 127.0.0.1 (``LocalCluster(engine="dask")``: workers
        named like local nodes, closed with the session), used through the Dask
        engine."""
        from dispynb.backends._dasklocal import DaskLocalCluster

        self.close()
        with friendly_errors(
            "%dispy local --engine dask could not start a Dask LocalCluster",
            hint="install Dask: pip install 'dispynb[dask]'",
        ):
            local = DaskLocalCluster(nodes=count, cpus=cpus)
        try:
            self.use_engine(
                local.engine, f"local Dask cluster {local.scheduler_address}"
            )
        except BaseException:
            local.close()
            raise
        self.local = self.nodes = local
        self._register_atexit()

    def use_dask(self, address: str) -> None:
        """Run on an existing Dask cluster, given its scheduler's address."""
        from dispynb.backends.dask import DaskEngine

        self.use_engine(
            DaskEngine(address),
            address,
            hint="check the scheduler's address, and that dispynb is installed on "
            "its workers (pip install 'dispynb[dask]')",
        )

    def use_scheduler(self, address: str, credential: str | None) -> None:
        """Run on the nodes of a ``dispynb-scheduler``, as the user whose
        credential file is ``credential`` (None: ``$DISPYNB_SECRET_FILE``)."""
        from dispynb import config as dispy_config
        from dispynb.backends.scheduler import SchedulerEngine
        from dispynb.transport.addressing import format_address, parse_address

        host, port = parse_address(address, dispy_config.SharedSchedulerPort)
        where = format_address(host, port)
        self.use_engine(
            SchedulerEngine(where),
            where,
            {"secret_file": credential} if credential else None,
            hint="check the scheduler's address and your credential (the file "
            "'dispynb-scheduler user add NAME' wrote: --secret-file FILE)",
        )

    def use_ray(self, address: str) -> None:
        """Run on an existing Ray cluster, given its head's address."""
        from dispynb.backends.ray import RayEngine

        self.use_engine(
            RayEngine(address),
            address,
            hint="check the head's address (ray status there prints it), that the "
            "Ray versions match, and that dispynb is installed on its nodes (pip "
            "install 'dispynb[ray]'); with token authentication set RAY_AUTH_MODE "
            "and RAY_AUTH_TOKEN here too",
        )

    def start_ssh(
        self,
        hosts: list[str],
        node_args: list[str],
        python: str,
        ssh_options: list[str],
        options: dict[str, Any],
        adapt: Adapt | None = None,
    ) -> None:
        """Start one node server per host over SSH (replacing the current nodes);
        with ``adapt``, as many as the runs' jobs need instead."""
        from dispynb.deploy import SSHNodes

        self.close()
        with friendly_errors(
            f"%dispy ssh could not start nodes on {' '.join(hosts)}",
            hint="check that `ssh HOST` works without a prompt and that dispynb is "
            "installed there for --python",
        ):
            self.local = SSHNodes(
                hosts,
                python=python,
                node_args=node_args,
                ssh_options=ssh_options,
                start=adapt is None,
            )
            self.nodes = self.local
            if adapt is not None:
                self.local.adapt(*adapt[:2], idle_timeout=adapt[2])
            self.options = dict(options)
            self._register_atexit()
            self.probe()
        self._show_in_use()

    def start_slurm(
        self,
        count: int,
        options: dict[str, Any],
        adapt: Adapt | None = None,
        **launcher: Any,
    ) -> None:
        """Submit ``count`` node servers as SLURM batch jobs (replacing the current
        nodes), or with ``adapt`` as many as the runs' jobs need; ``launcher`` are
        `SlurmNodes`' options."""
        from dispynb.deploy import SlurmNodes

        self.close()
        with friendly_errors(
            "%dispy slurm could not start the nodes",
            hint="check that sbatch works here (a SLURM login node), that the "
            "partition and options are right, and that dispynb is installed for "
            "--python on the compute nodes",
        ):
            self.local = SlurmNodes(0 if adapt else count, **launcher)
            self.nodes = self.local
            if adapt is not None:
                self.local.adapt(*adapt[:2], idle_timeout=adapt[2])
            self.options = dict(options)
            self._register_atexit()
            self.probe()
        self._show_in_use()

    def attach(self, specs: list[str], options: dict[str, Any]) -> None:
        """Use node servers started elsewhere, after checking that they answer."""
        self.close()
        self.nodes = specs
        self.options = options
        try:
            with friendly_errors(
                f"%dispy nodes: cannot use {' '.join(specs)}",
                hint="check that dispynb-node runs there with the same secret "
                "(and TLS options), or start nodes here with %dispy local",
            ):
                self.probe()
        except BaseException:
            self.nodes, self.options = None, {}
            raise
        self._show_in_use()

    def _show_in_use(self) -> None:
        """The panel keeps the nodes in use; others show as gone, then go."""
        self.panel.in_use([address for _, address, _ in self.known_nodes()])

    def rows(self) -> list[Any]:
        """The panel's rows, local nodes whose process exited marked gone."""
        if self.local is not None and self.nodes is self.local:
            exited = [item.split(" ", 1)[0] for item in self.local.exited()]
            self.panel.table.mark_gone(exited)
        return self.panel.rows()

    def probe(self) -> None:
        """Connect to every node once (authenticating), to fill the node panel and
        report errors now rather than at the first run."""
        cluster = self.cluster_factory(
            _dispynb_node_probe, nodes=self.nodes, engine=self.engine,
            cluster_status=self.panel.cluster_status,
            **{**self.options, "recover_file": False},  # a probe leaves no journal
        )  # fmt: skip
        cluster.close()

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
        if self.local is not None and self.nodes is self.local:
            pairs = list(self.local.addresses)
        else:
            pairs = [
                (spec.host, spec.port or NODE_PORT)
                for spec in parse_node_specs(self.nodes)
            ]
        names = {row.address: row.name for row in self.panel.rows()}
        return [
            (host, f"{host}:{port}", names.get(f"{host}:{port}", ""))
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
            if specs[matches[0]] not in chosen:
                chosen.append(specs[matches[0]])
        options = dict(self.options)
        if self.local is not None and self.nodes is self.local and self.local.secret:
            options.setdefault("secret", self.local.secret)
        return chosen, options

    def ensure_nodes(self) -> bool:
        """Start local nodes if none were chosen; return whether it did.

        Raises `MagicError` if the local nodes this session started have exited.
        """
        if self.attached:
            exited = self.exited_error()
            if exited is not None:
                raise exited
            return False
        self.start_local(1, None)
        return True

    def exited_error(self) -> MagicError | None:
        """The error saying which of the nodes this session started have exited
        (None while they all run, or if it started none)."""
        if self.local is None or self.nodes is not self.local:
            return None
        gone = self.local.exited()
        if not gone:
            return None
        kind = launcher_kind(self.local)
        return MagicError(
            f"the {kind} nodes have exited: {', '.join(gone)}; "
            f"start new ones with %dispy {kind}"
        )

    def close(self) -> None:
        """Cancel and close every run, and stop local nodes this session started."""
        for run in self.runs:
            run.cancel()
            run.close(terminate=True)
        self.runs = []
        if self.local is not None:
            self.local.close()
        self.local = None
        self.nodes = None
        engine, self.engine, self.engine_label = self.engine, None, ""
        close_engine = getattr(engine, "close", None)
        if callable(close_engine):
            close_engine()
        self.options = {}
        self.panel.in_use([])
        if self._atexit:
            atexit.unregister(self.close)
            self._atexit = False

    def _register_atexit(self) -> None:
        if not self._atexit:
            atexit.register(self.close)
            self._atexit = True

    def status(self) -> SessionStatus:
        return SessionStatus(self)


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
        if hasattr(self.nodes, "node_specs"):
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
        lines.append(f"{len(self.runs)} runs")
        lines += [f"  {run!r}" for run in self.runs]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        parts = [f"<div>{html.escape(self._where())}</div>"]
        parts.append(templates.nodes_html(self.rows))
        parts += [templates.progress_html(r.counts(), r.name) for r in self.runs]
        return f"<div class='dispynb-status'>{''.join(parts)}</div>"


@magics_class
class DispyMagics(Magics):
    """The ``%dispy`` line magic and the ``%%dispy`` cell magic."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.session = Session()

    @property
    def _ip(self) -> Any:
        """The shell (never None once the magics are registered)."""
        if self.shell is None:
            raise UsageError("the dispynb magics are not attached to a shell")
        return self.shell

    # -- %dispy ----------------------------------------------------------------------

    @magic_arguments()
    @argument(
        "action",
        choices=[
            "local",
            "nodes",
            "ssh",
            "slurm",
            "dask",
            "ray",
            "scheduler",
            "status",
            "panel",
            "close",
        ],
        help=(
            "local: start node servers on this machine (127.0.0.1, random secret); "
            "nodes: use node servers started elsewhere (dispynb-node), given as "
            "HOST or HOST:PORT; ssh: start one node server on each HOST over ssh "
            "(stopped by close, or when the kernel ends); slurm: submit --nodes "
            "node servers as SLURM batch jobs (cancelled by close, or when the "
            "kernel exits); dask: run on an existing Dask cluster, given its "
            "scheduler's ADDRESS; ray: run on an existing Ray cluster, given its "
            "head's ADDRESS (what ray.init takes); scheduler: share the nodes of a "
            "dispynb-scheduler at HOST[:PORT] (--secret-file: your credential); "
            "status: show the nodes "
            "and the runs; panel: show a live table of the nodes; close: cancel "
            "every run and stop local nodes"
        ),
    )
    @argument(
        "hosts",
        nargs="*",
        metavar="HOST[:PORT]",
        help="nodes for 'nodes'; ssh destinations for 'ssh'; the scheduler's "
        "address for 'dask' (tcp://host:8786); the head's address for 'ray' "
        "(host:6379, ray://host:10001)",
    )
    @argument(
        "--nodes",
        dest="count",
        type=int,
        default=1,
        metavar="N",
        help="local: how many node servers to start (default 1); slurm: how many "
        "batch jobs to submit (default 1)",
    )
    @argument(
        "--cpus",
        type=int,
        default=None,
        metavar="N",
        help="local: CPUs per node (default: this machine's CPUs shared by the "
        "nodes); ssh: CPUs per node (default: all of each host's); slurm: CPUs per "
        "job (--cpus-per-task)",
    )
    @argument(
        "--engine",
        choices=["nodes", "dask"],
        default=None,
        help="local: start dispynb's node servers (nodes, the default) or a Dask "
        "LocalCluster used through the Dask engine (dask; --nodes worker processes "
        "of --cpus threads); the default can be set with $DISPYNB_LOCAL_ENGINE",
    )
    @argument(
        "--python",
        default=None,
        metavar="PATH",
        help="ssh: the Python with dispynb installed on the hosts (default python3); "
        "slurm: on the compute nodes (default: this kernel's)",
    )
    @argument("--memory", metavar="SIZE", help="slurm: memory per job (--mem: 4G)")
    @argument(
        "--walltime",
        metavar="TIME",
        help="slurm: time limit per job (--time: minutes, H:MM:SS, D-HH)",
    )
    @argument("--partition", metavar="NAME", help="slurm: the partition")
    @argument("--account", metavar="NAME", help="slurm: the account to charge")
    @argument(
        "--directive",
        action="append",
        default=[],
        metavar="OPTION",
        help="slurm: another #SBATCH option, e.g. --directive=--qos=short (repeatable)",
    )
    @argument(
        "--adapt",
        metavar="MIN:MAX",
        help="ssh, slurm: start nodes as the runs' jobs need them, between MIN and "
        "MAX nodes; nodes idle for --idle-timeout seconds stop (after their jobs)",
    )
    @argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="ssh, slurm with --adapt: how long a node may sit idle (default 60)",
    )
    @argument(
        "--ssh-config",
        metavar="FILE",
        help="ssh: an ssh configuration file to use instead of ~/.ssh/config",
    )
    @argument(
        "--secret-file",
        metavar="FILE",
        help="nodes: file holding the nodes' shared secret (or set DISPYNB_SECRET or "
        "DISPYNB_SECRET_FILE in the environment); scheduler: your credential file",
    )
    @argument("--cafile", metavar="FILE", help="nodes: use TLS, verify nodes with it")
    @argument("--certfile", metavar="FILE", help="nodes: TLS client certificate")
    @argument("--keyfile", metavar="FILE", help="nodes: key of --certfile")
    @argument(
        "--pulse",
        type=float,
        metavar="SECONDS",
        help="local, nodes: how often nodes report their load (CPU, memory) to "
        "the node panel while runs use them (default: every 10 s)",
    )
    @line_magic
    def dispy(self, line: str) -> Any:
        """Choose the nodes ``%%dispy`` runs on, and show or close them.

        Examples::

            %dispy local --cpus 2                    # one local node with 2 CPUs
            %dispy local --nodes 2 --cpus 1          # two local nodes
            %dispy nodes 10.0.0.5 node2:9711 --secret-file ~/.dispynb-secret
            %dispy nodes node1 --cafile ca.pem --secret-file ~/.dispynb-secret
            %dispy ssh node1 node2 --python /opt/venv/bin/python   # over ssh
            %dispy slurm --nodes 4 --cpus 8 --memory 16G --walltime 2:00:00
            %dispy dask tcp://scheduler:8786         # an existing Dask cluster
            %dispy scheduler sched1 --secret-file ~/alice.credential  # shared nodes
            %dispy ssh node1 node2 node3 --adapt 0:3 --idle-timeout 120
            %dispy local --nodes 2 --pulse 2         # load reported every 2 s
            %dispy status                            # nodes and runs (returns a repr)
            %dispy panel                             # live table of the nodes
            %dispy close                             # cancel runs, stop local nodes

        Starting or attaching replaces the current nodes (and cancels their runs).
        The panel shows each node's CPUs, busy workers, jobs done, and its load (CPU
        used, memory free) as last reported: when a run connects, then every
        ``--pulse`` seconds while runs use it.
        """
        args = parse_line(self.dispy, line)
        session = self.session
        if (
            args.action not in ("nodes", "ssh", "dask", "ray", "scheduler")
            and args.hosts
        ):
            raise UsageError(f"%dispy {args.action} takes no hosts: {args.hosts}")
        if args.engine is not None and args.action != "local":
            raise UsageError("--engine is for %dispy local")
        if args.pulse is not None and args.action not in (
            "local",
            "nodes",
            "ssh",
            "slurm",
        ):
            raise UsageError("--pulse is for %dispy local, nodes, ssh and slurm")
        pulse = {} if args.pulse is None else {"pulse_interval": args.pulse}
        if args.adapt is not None and args.action not in ("ssh", "slurm"):
            raise UsageError("--adapt is for %dispy ssh and slurm")
        adapt = None if args.adapt is None else adapt_bounds(args.adapt, args)
        if args.action == "local":
            if args.count < 1 or (args.cpus is not None and args.cpus < 1):
                raise UsageError("--nodes and --cpus must be at least 1")
            session.start_local(args.count, args.cpus, pulse, args.engine)
            print(f"dispynb: {session.status()._where()}")
            return None
        if args.action == "ssh":
            if not args.hosts:
                raise UsageError("%dispy ssh needs at least one HOST")
            if args.cpus is not None and args.cpus < 1:
                raise UsageError("--cpus must be at least 1")
            node_args = [] if args.cpus is None else ["--cpus", str(args.cpus)]
            ssh_options = (
                ["-F", os.path.expanduser(args.ssh_config)] if args.ssh_config else []
            )
            session.start_ssh(
                list(args.hosts),
                node_args,
                args.python or "python3",
                ssh_options,
                pulse,
                adapt,
            )
            print(f"dispynb: {session.status()._where()}")
            return None
        if args.action == "slurm":
            if args.count < 1 or (args.cpus is not None and args.cpus < 1):
                raise UsageError("--nodes and --cpus must be at least 1")
            launcher = {
                "cpus": args.cpus,
                "memory": args.memory,
                "walltime": args.walltime,
                "partition": args.partition,
                "account": args.account,
                "directives": args.directive,
            }
            if args.python:
                launcher["python"] = args.python
            session.start_slurm(args.count, pulse, adapt, **launcher)
            print(f"dispynb: {session.status()._where()}")
            return None
        if args.action == "dask":
            if len(args.hosts) != 1:
                raise UsageError("%dispy dask needs the scheduler's ADDRESS only")
            session.use_dask(args.hosts[0])
            print(f"dispynb: {session.status()._where()}")
            return None
        if args.action == "scheduler":
            if len(args.hosts) != 1:
                raise UsageError("%dispy scheduler needs the scheduler's HOST[:PORT]")
            credential = args.secret_file and os.path.expanduser(args.secret_file)
            session.use_scheduler(args.hosts[0], credential)
            print(f"dispynb: {session.status()._where()}")
            return None
        if args.action == "ray":
            if len(args.hosts) != 1:
                raise UsageError("%dispy ray needs the Ray cluster's ADDRESS only")
            session.use_ray(args.hosts[0])
            print(f"dispynb: {session.status()._where()}")
            return None
        if args.action == "nodes":
            if not args.hosts:
                raise UsageError("%dispy nodes needs at least one HOST[:PORT]")
            options = {
                key: os.path.expanduser(value)
                for key, value in (
                    ("secret_file", args.secret_file),
                    ("cafile", args.cafile),
                    ("certfile", args.certfile),
                    ("keyfile", args.keyfile),
                )
                if value
            }
            session.attach(list(args.hosts), {**options, **pulse})
            print(f"dispynb: {session.status()._where()}")
            return None
        if args.action == "status":
            return session.status()
        if args.action == "panel":
            display(session.panel)
            return None
        started = session.local
        session.close()
        kind = launcher_kind(started)
        stopped = f", {kind} nodes stopped" if started is not None else ""
        print(f"dispynb: runs cancelled and closed{stopped}")
        return None

    # -- %%dispy ---------------------------------------------------------------------

    @magic_arguments(name="%dispy")  # the usage line then reads %%dispy
    @argument(
        "function",
        nargs="?",
        help="name of the function to run (default: the last function the cell "
        "defines with def)",
    )
    @argument(
        "--over",
        required=True,
        metavar="EXPR",
        help="Python expression giving the inputs, evaluated in the notebook's "
        'namespace: one job per item, e.g. --over "range(100)" or --over xs',
    )
    @argument(
        "--into",
        metavar="NAME",
        help="variable to store the run in (a dispynb.jupyter.Run: .results, .df, "
        ".jobs, .failures, .wait(), .cancel()); the last run is also in _dispy",
    )
    @argument(
        "--nowait",
        action="store_true",
        help="return at once; progress and output update live in the cell's widgets",
    )
    @argument(
        "--unpack",
        action="store_true",
        help="items are argument tuples, f(*item), or keyword dicts, f(**item)",
    )
    @argument(
        "--setup",
        metavar="NAME",
        help="name of a setup function run once on each node before the jobs "
        "(as JobCluster(setup=...)): load data into globals there",
    )
    @argument(
        "--depends",
        metavar="EXPR",
        help="Python expression giving a list of dependencies sent once to each "
        "node before the jobs, as JobCluster(depends=...): data files (placed in "
        "the jobs' working directory, and kept by the node so that the same file "
        "is not sent again), modules, functions, classes",
    )
    @argument(
        "--on",
        action="append",
        metavar="NODE",
        help="run only on this node (HOST:PORT, host or name, as %%dispy status "
        "lists them); repeat for several nodes; default: every node in use",
    )
    @argument(
        "--progress",
        choices=KINDS,
        default="auto",
        help="progress display: widget in a kernel, text in a terminal (auto), or "
        "html (static, for front ends without widgets), or none",
    )
    @argument(
        "--quiet",
        action="store_true",
        help="do not print remote stdout, stderr and tracebacks (still in .df)",
    )
    @argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="wait at most this long, then cancel the unfinished jobs",
    )
    @_cell_magic_named("dispy")
    def cell_dispy(self, line: str, cell: str) -> None:
        """Run a function defined in this cell once per input, on the nodes.

        The cell is executed in the notebook's namespace first (so its functions,
        classes and imports are defined there too); then the function named on the
        magic line, or the last one the cell defines, runs once per item of
        ``--over``. Functions, closures, helpers and classes defined in cells travel
        by value.

        By default the cell blocks, showing live progress, and prints each job's
        remote stdout and stderr as the job ends, and the remote traceback of the
        first failure of each exception type. Interrupting the cell (Stop button,
        Ctrl-C) cancels the run's queued and running jobs on the nodes.

        Without ``%dispy local`` or ``%dispy nodes`` first, one local node using
        every CPU is started.

        A function that captures a large object (over 1 MB pickled: a closure
        variable, a global, a default argument) gets a warning naming it: that
        object is sent to every node with the function on every run. Send it once
        with ``--depends`` (as a file) and ``--setup`` instead.

        Jobs that call ``dispy_provisional_result(value)`` show the count and the
        latest value in the progress; ``run.provisional`` and the ``provisional``
        column of ``run.df`` hold each job's latest one. Files a job sends back
        with ``dispy_send_file(path)`` are saved under the notebook's directory.

        Remote tracebacks point at the cell lines the failing code came from when
        that is unambiguous (``Cell In[3], line 4, in f`` and the line itself).

        Examples::

            %%dispy --over "range(100)" --into run
            def square(x):
                return x * x

            %%dispy simulate --over "[(s, 0.1) for s in seeds]" --unpack --nowait
            def simulate(seed, noise): ...

            %%dispy --over "words" --depends "['table.csv']" --setup load --on local-1
            def lookup(word): ...

        Then ``run.results``, ``run.df`` (one row per job), ``run.failures``.
        """
        args = parse_line(self.cell_dispy, line)
        if args.into is not None and not args.into.isidentifier():
            raise UsageError(f"--into needs a variable name, not {args.into!r}")
        if args.function is not None and not args.function.isidentifier():
            raise UsageError(f"the function must be a name, not {args.function!r}")
        if not self._run_body(cell).success:
            return None
        name = args.function or _last_function(self._ip.transform_cell(cell))
        if name is None:
            raise UsageError(
                "this cell defines no function: define one with def, or name one "
                "on the magic line (%%dispy NAME --over ...)"
            )
        func = self._lookup(name, "function")
        setup = self._lookup(args.setup, "--setup") if args.setup else None
        inputs = self._ip.ev(_unquote(args.over))
        depends = None
        if args.depends is not None:
            depends = self._ip.ev(_unquote(args.depends))
            if not isinstance(depends, list | tuple):
                depends = [depends]  # one file, module or function
        session = self.session
        label = args.into or name
        runs: list[Run] = []  # the run, once Run.map returns it (for the panel)
        try:
            if session.ensure_nodes():
                print(f"dispynb: started {session.status()._where()}", file=sys.stderr)
            nodes = session.nodes
            options = dict(session.options)
            if args.on:
                nodes, options = session.select_nodes(args.on)
            if setup is not None:
                options["setup"] = setup
            if depends is not None:
                options["depends"] = list(depends)
            with friendly_errors(
                f"%%dispy could not start run {label!r}", hint=NODES_HINT
            ):
                run = Run.map(
                    func,
                    inputs,
                    nodes=nodes,
                    engine=session.engine,
                    cluster_factory=session.cluster_factory,
                    unpack=args.unpack,
                    wait=False,
                    progress="none" if args.nowait else args.progress,
                    name=label,
                    listeners=[_panel_listener(session.panel, runs)],
                    **options,
                )
                runs.append(run)
        except MagicError as exc:
            # Nodes that died as the run started: that is the news, not the refusal.
            exited = session.exited_error()
            if exited is None or str(exited) == str(exc):
                exited = None
            # The names still say what happened: no stale run from an earlier cell.
            self._keep(Run.failed(label, str(exited or exc)), args.into)
            if exited is None:
                raise
            raise exited from None
        except KeyboardInterrupt:
            # Stop while connecting or submitting: Run.map cancelled what it sent.
            message = f"Interrupted: run {label!r} stopped before it started"
            self._keep(Run.failed(label, message), args.into)
            raise RunInterrupted(message) from None
        session.runs.append(run)
        self._keep(run, args.into)
        if args.nowait:
            self._go_live(run, args.progress)
            return None
        if not run.wait(timeout=args.timeout, echo=not args.quiet):
            run.stop(f"Timed out after {args.timeout} s")
        return None

    def _keep(self, run: Run, into: str | None) -> None:
        self._ip.user_ns[LAST_RUN] = run
        if into:
            self._ip.user_ns[into] = run

    def _run_body(self, cell: str) -> Any:
        """Execute the cell's body in the notebook's namespace, compiled as the
        lines the person sees: tracebacks (local, and remote ones rewritten by
        `dispynb.jupyter.tracebacks`) name this cell's prompt number and its
        editor lines, counting the ``%%dispy`` line."""
        shell = self._ip
        number, header = cell_origin(shell, cell)
        if number is None:
            return shell.run_cell(cell, store_history=False)
        # Comments keep the lines in place (IPython drops leading blank lines).
        source = "".join(f"#{line}\n" for line in header) + cell
        saved = shell.execution_count
        shell.execution_count = number  # the compiled code is named after it
        try:
            return shell.run_cell(source, store_history=False)
        finally:
            shell.execution_count = saved

    def _lookup(self, name: str, what: str) -> Any:
        value = self._ip.user_ns.get(name)
        if value is None or not callable(value):
            raise UsageError(f"{what}: {name!r} is not a function in the notebook")
        return value

    def _go_live(self, run: Run, kind: str) -> None:
        kind = resolve_kind(kind)
        bar = make_progress(kind if kind == "widget" else "none", title=run.name)
        log = None
        if kind == "widget":
            import ipywidgets

            out = ipywidgets.Output()
            bar.show()
            display(out)

            def log(stream: str, text: str) -> None:
                if stream == "stdout":
                    out.append_stdout(text)
                else:
                    out.append_stderr(text)

        else:
            display(run)
        run.live(bar, log)


def _dispynb_node_probe(x: Any) -> Any:
    """The computation of the clusters that only check that the nodes answer (the
    lab panel does not show them: `dispynb.jupyter.labcomm.INTERNAL`)."""
    return x


def _panel_listener(panel: NodePanel, runs: list[Run]) -> Callable[..., None]:
    """Feed ``panel`` a run's events, telling a node that left while the run's
    cluster was open (it died or shut down) from one released at its close."""

    def listener(status: int, node: Any, job: Any) -> None:
        from dispynb.node import NodeStatus

        cluster = runs[0].cluster if runs else None
        lost = (
            status == NodeStatus.Closed
            and cluster is not None
            and not getattr(cluster, "_closed", True)
        )
        panel.cluster_status(status, node, job, lost=lost)

    return listener


def _spec(host: str, address: str) -> str:
    """The node spec for ``address`` (``host:port``), bracketing IPv6 hosts."""
    return f"[{host}]{address[len(host) :]}" if ":" in host else address


def _bracketless(address: str) -> str:
    """``'::1:9711'`` for ``'[::1]:9711'`` (the panel's form of IPv6 addresses)."""
    if address.startswith("[") and "]:" in address:
        host, port = address[1:].split("]:", 1)
        return f"{host}:{port}"
    return address


def _unquote(text: str) -> str:
    """Strip one pair of matching quotes: IPython's argument splitter keeps them."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _last_function(source: str) -> str | None:
    """Name of the last top-level ``def`` in ``source`` (None if none or invalid)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    names = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    return names[-1] if names else None
