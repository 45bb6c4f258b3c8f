"""The nodes ``%dispy`` chose for a notebook: the `Session` behind the magics.

A `Session` (one per IPython shell) remembers the nodes (local ones it started, or
ones it attached to), the engine, every run and a node panel; ``%dispy status``
shows its `SessionStatus`. The magics (`dispynb.jupyter.magics`) parse what a person
typed and call it.

This module is the session's life: starting nodes or attaching to them (replacing
the ones in use only once the new ones answer), its runs, closing. Its parts:
`dispynb.jupyter.probing` (checking that nodes answer before using them),
`dispynb.jupyter.sessionnodes` (the nodes in use, and choosing among them) and
`dispynb.jupyter.sessionstatus` (what ``%dispy status`` shows).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from IPython.core.error import UsageError

from dispynb.backends.base import Engine
from dispynb.cluster import ClusterFactory, new_cluster
from dispynb.defaults import LOCAL_ENGINE_ENV
from dispynb.jupyter.errors import MagicError
from dispynb.jupyter.magicsupport import Adapt, friendly_errors, nodes_words
from dispynb.jupyter.probing import _SessionProbes
from dispynb.jupyter.run import Run
from dispynb.jupyter.sessionnodes import _SessionNodes
from dispynb.jupyter.sessionstatus import SessionStatus, launcher_kind, where_line
from dispynb.jupyter.widgets import NodePanel

__all__ = ["Session", "SessionStatus", "launcher_kind"]


class Session(_SessionProbes, _SessionNodes):
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
        # Runs not done, and weak references to the done ones (`runs`).
        self._runs: list[Run | weakref.ref[Run]] = []
        self.panel = NodePanel()
        self._atexit = False

    @property
    def runs(self) -> list[Run]:
        """The runs this session started, oldest first: those not done, and those
        done that the notebook still holds (in a variable). A done run nobody
        holds (its cell was run again under the same name) lets go of its jobs and
        results: a notebook that runs a cell a hundred times keeps one result."""
        runs, kept = [], []
        for entry in self._runs:
            run = entry() if isinstance(entry, weakref.ref) else entry
            if run is None:
                continue
            runs.append(run)
            kept.append(weakref.ref(run) if run.done() else run)
        self._runs = kept
        return runs

    def add_run(self, run: Run) -> None:
        """Follow ``run`` (see `runs`)."""
        self.runs  # noqa: B018 (drops the runs let go of, weakens the done ones)
        self._runs.append(run)
        # Last registered, first run: at exit (the kernel shut down or restarted)
        # the runs still going are cancelled before the clusters' own exit hook
        # ends their jobs (dispynb._live), so they count as cancelled, as on Stop,
        # not as failed ("job terminated at the client's request").
        atexit.unregister(self._cancel_runs)
        atexit.register(self._cancel_runs)

    def _cancel_runs(self) -> None:
        for run in self.runs:
            if not run.done():
                run.cancel()

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
        options = dict(options or {})
        try:
            with friendly_errors(
                f"%dispy: cannot use the {engine.name} engine ({label})",
                hint=self._kept(hint),
            ):
                replay = self._probe(None, engine, options)
        except BaseException:
            _close_engine(engine)
            raise
        self.close()  # the new engine works: only now give up the current nodes
        self.engine, self.engine_label, self.options = engine, label, options
        replay()
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
        engine = engine or os.environ.get(LOCAL_ENGINE_ENV) or "nodes"
        if engine == "dask":
            self.start_local_dask(count, cpus)
            return
        if engine != "nodes":
            raise UsageError(
                f"{LOCAL_ENGINE_ENV}={engine}: use 'nodes' (dispynb's node servers) "
                "or 'dask'"
            )
        self._start_then_replace(
            lambda: _local_nodes(count, cpus),
            dict(options or {}),
            "%dispy local could not start the nodes",
            hint="",
        )

    def start_local_dask(self, count: int, cpus: int | None) -> None:
        """A Dask cluster on 127.0.0.1 (``LocalCluster(engine="dask")``: workers
        named like local nodes, closed with the session), used through the Dask
        engine."""
        from dispynb.backends._dasklocal import DaskLocalCluster

        self.close()
        with friendly_errors(
            "%dispy local --engine dask could not start a Dask LocalCluster",
            hint="install Dask: pip install 'dask[distributed]'",
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
            "its workers (pip install . in dispynb's checkout)",
        )

    def use_scheduler(
        self, address: str, credential: str | None, cafile: str | None = None
    ) -> None:
        """Run on the nodes of a ``dispynb-scheduler``, as the user whose
        credential file is ``credential`` (None: ``$DISPYNB_SECRET_FILE``); over
        TLS, checking its certificate with ``cafile``, if given."""
        from dispynb import config as dispy_config
        from dispynb.backends.scheduler import SchedulerEngine
        from dispynb.transport.addressing import format_address, parse_address

        host, port = parse_address(address, dispy_config.SharedSchedulerPort)
        where = format_address(host, port)
        self.use_engine(
            SchedulerEngine(where),
            where,
            {
                key: value
                for key, value in (("secret_file", credential), ("cafile", cafile))
                if value
            }
            or None,
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
            "install . in dispynb's checkout); with token authentication set "
            "RAY_AUTH_MODE and RAY_AUTH_TOKEN here too",
        )

    def start_ssh(
        self,
        hosts: list[str],
        node_args: list[str],
        python: str,
        ssh_options: list[str],
        options: dict[str, Any],
        adapt: Adapt | None = None,
        register_host: str | None = None,
    ) -> None:
        """Start one node server per host over SSH (replacing the current nodes);
        with ``adapt``, as many as the runs' jobs need instead. ``register_host``:
        as `SSHNodes`' (this machine's address that the hosts reach)."""
        from dispynb.deploy import SSHNodes

        def start() -> Any:
            launcher = SSHNodes(
                hosts,
                python=python,
                node_args=node_args,
                ssh_options=ssh_options,
                register_host=register_host,
                start=adapt is None,
            )
            if adapt is not None:
                launcher.adapt(*adapt[:2], idle_timeout=adapt[2])
            return launcher

        self._start_then_replace(
            start,
            options,
            f"%dispy ssh could not start nodes on {' '.join(hosts)}",
            hint="check that `ssh HOST` works without a prompt and that dispynb "
            "is installed there for --python",
        )

    def _start_then_replace(
        self, start: Callable[[], Any], options: dict[str, Any], what: str, hint: str
    ) -> None:
        """Start new nodes with ``start()`` (a launcher) and check that they answer,
        then give up the current nodes for them. If starting fails, or is
        interrupted, stop what did start and keep the current nodes."""
        launcher = None
        try:
            with friendly_errors(what, hint=self._kept(hint)):
                launcher = start()
                replay = self._probe(launcher, None, options)
        except BaseException:
            if launcher is not None:
                launcher.close()
            raise
        self.close()
        self.local = self.nodes = launcher
        self.options = options
        self._register_atexit()
        replay()
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
        `SlurmNodes`' options.

        Unlike the other launchers, the current nodes stop first: their allocation
        may be what the new batch jobs wait for (a user's job or CPU limit)."""
        from dispynb.deploy import SlurmNodes

        self.close()
        with (
            self._closed_on_failure(),
            friendly_errors(
                "%dispy slurm could not start the nodes",
                hint="check that sbatch works here (a SLURM login node), that the "
                "partition and options are right, and that dispynb is installed for "
                "--python on the compute nodes",
            ),
        ):
            self.local = SlurmNodes(0 if adapt else count, **launcher)
            self.nodes = self.local
            if adapt is not None:
                self.local.adapt(*adapt[:2], idle_timeout=adapt[2])
            self.options = dict(options)
            self._register_atexit()
            self.probe()
        self._show_in_use()

    @contextlib.contextmanager
    def _closed_on_failure(self) -> Iterator[None]:
        """Starting nodes failed (or was interrupted): stop what did start, and keep
        no nodes, so that ``%dispy status`` and the next cell say there are none
        rather than tripping over a launcher whose nodes never came."""
        try:
            yield
        except BaseException:
            self.close()
            raise

    def attach(self, specs: list[str], options: dict[str, Any]) -> None:
        """Use node servers started elsewhere, after checking that they answer.

        The nodes in use are given up only then: if none of ``specs`` answers, the
        error names them and the notebook keeps its nodes (and runs)."""
        try:
            with friendly_errors(
                f"%dispy nodes: cannot use {' '.join(specs)}",
                hint=self._kept(
                    "check that dispynb-node runs there with the same secret (a "
                    "copy of its file, given with --secret-file FILE) and TLS "
                    "options, or start nodes here with %dispy local"
                ),
            ):
                usable, failed, replay = self._probe_each(specs, options)
        except MagicError as exc:
            raise MagicError(nodes_words(str(exc), specs)) from None
        self.close()
        self.nodes, self.options = usable, options
        replay()
        self._show_in_use()
        if failed:
            # Said once, here: a node left in the list would fail (and be logged)
            # again at every cell, and show as in use.
            why = nodes_words("; ".join(failed.values()), list(failed))
            print(
                f"dispynb: not using {', '.join(failed)}: {why}\n"
                "check that dispynb-node runs there with the same secret (and TLS "
                f"options), then %dispy nodes {' '.join(specs)} again",
                file=sys.stderr,
            )

    def _kept(self, hint: str) -> str:
        """``hint``, then what stays in use when new nodes cannot be used."""
        if not self.attached:
            return hint
        kept = f"still in use: {self.where()}"
        return f"{hint}\n{kept}" if hint else kept

    def ensure_nodes(self) -> bool:
        """Start local nodes if none were chosen; return whether it did.

        Raises `MagicError` if the local nodes this session started have exited;
        if some have, says so on stderr (the cell runs on the others).
        """
        if self.attached:
            exited = self.exited_error()
            if exited is not None:
                raise exited
            news = self.exited_news()
            if news:
                print(f"dispynb: {news}", file=sys.stderr)
            return False
        self.start_local(1, None)
        return True

    def stop_runs(self, name: str) -> None:
        """Stop the unfinished runs named ``name`` (a ``--nowait`` cell executed
        again starts its new run under that name), each saying so on stderr in one
        line: running jobs terminated, queued ones cancelled, in one request."""
        for run in self.runs:
            if run.name == name and not run.done():
                print(run.stop("dispynb", echo=False, quiet=True), file=sys.stderr)

    def close(self, ended: bool = False) -> None:
        """Cancel and close every run, and stop local nodes this session started.

        A run that had unfinished jobs (a ``--nowait`` one) says so on stderr, in
        the cell that replaced or closed its nodes: its results stop here.
        ``ended`` (``%dispy close``): the panel keeps the nodes as they last
        stood, saying that it stopped them (else they show as gone, replaced)."""
        stopped = []
        runs = self.runs
        for run in runs:
            unfinished = [job for job in list(run.jobs) if not job.done()]
            run.cancel()
            run.close(terminate=True)
            if unfinished:
                stopped.append(run._stop_summary("dispynb", unfinished))
        # Ended now: still listed (`runs`) while a variable of the notebook holds them.
        self._runs = [weakref.ref(run) for run in runs]
        if ended:  # as they stood after the runs, not greyed as gone
            let_go = "stopped them" if self.local is not None else "let them go"
            self.panel.stopped(f"%dispy close {let_go}")
        if self.local is not None:
            self.local.close()
        self.local = None
        self.nodes = None
        engine, self.engine, self.engine_label = self.engine, None, ""
        _close_engine(engine)
        self.options = {}
        self.panel.in_use([])
        atexit.unregister(self._cancel_runs)
        if self._atexit:
            atexit.unregister(self.close)
            self._atexit = False
        # Last, and never in the way: at exit the kernel's streams may be closed.
        with contextlib.suppress(ValueError, OSError):
            for line in stopped:
                print(line, file=sys.stderr)
            if stopped:  # before what the cell prints next on stdout, not after
                sys.stderr.flush()

    def _register_atexit(self) -> None:
        if not self._atexit:
            atexit.register(self.close)
            self._atexit = True

    def status(self) -> SessionStatus:
        return SessionStatus(self)

    def where(self) -> str:
        """The nodes (or engine) in use, in a line (``local nodes 127.0.0.1:9711``)."""
        return where_line(self)


def _close_engine(engine: Engine | None) -> None:
    """Close ``engine`` if it has a ``close()`` (engines need not)."""
    close = getattr(engine, "close", None)
    if callable(close):
        close()


def _local_nodes(count: int, cpus: int | None) -> Any:
    """`LocalCluster` nodes whose exit says to run ``%dispy local`` again."""
    from dispynb.local import LocalCluster

    local = LocalCluster(nodes=count, cpus=cpus)
    local.restart_hint = "run %dispy local again for new nodes"
    return local
