"""A Dask cluster on this machine that stands in for `dispynb.LocalCluster`.

``LocalCluster(engine="dask")`` (or ``$DISPYNB_LOCAL_ENGINE=dask``) returns a
`DaskLocalCluster`: a Dask ``SpecCluster`` of one scheduler (in this process, on
127.0.0.1, no dashboard) and ``nodes`` worker processes of ``cpus`` threads each,
named ``local-0``, ``local-1``... like dispynb's local node servers, so that
``%%dispy --on local-1`` and ``dispy_node_name`` read the same on both engines.
``JobCluster(compute, nodes=local)`` then runs on it through its `engine` (a
`DaskEngine`).

Each Dask worker process leaves this process's group at start (this module is its
``preload``, `dask_setup`): JupyterLab's Stop interrupts the kernel with
``os.killpg(SIGINT)``, which must cancel the run, not kill the Dask workers (as it
never reaches dispynb's own local nodes, started in sessions of their own). The
workers still die with this process: Dask's nanny (here, in this process) holds
the pipe each worker watches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from typing import Any

from dispynb.backends._daskselect import _host_port
from dispynb.backends.dask import DaskEngine
from dispynb.errors import ClusterError, ConfigurationError
from dispynb.local import START_TIMEOUT, LocalCluster, cpus_per_node

_MISSING_DASK = (
    "LocalCluster(engine='dask') needs dask.distributed: pip install "
    "'dask[distributed]' (or '.[dask]' in dispynb's checkout)"
)


def dask_setup(worker: Any) -> None:
    """Dask's preload hook, in each worker process: leave the kernel's process
    group (see the module's docstring)."""
    with contextlib.suppress(OSError):  # already a group leader: nothing to leave
        os.setsid()


class DaskLocalCluster(LocalCluster):
    """A Dask cluster on 127.0.0.1 with `LocalCluster`'s API (see the module).

    ``secret`` is not used (Dask's local cluster is reached over loopback without
    one; give ``security`` to a `DaskEngine` for TLS); ``addresses`` are the
    workers' ``(host, port)``; `engine` runs a `JobCluster` on it.
    """

    def __init__(
        self,
        nodes: int = 1,
        cpus: int | None = None,
        *,
        secret: str | None = None,
        loglevel: str = "warning",
        engine: str | None = None,
        max_message_size: int | None = None,  # dispynb nodes' only
    ) -> None:
        cpus = cpus_per_node(nodes, cpus)
        try:
            import distributed
        except ImportError as exc:
            raise ConfigurationError(_MISSING_DASK) from exc
        self.secret = None  # type: ignore[assignment]
        self.cpus = cpus
        self.tls = False
        self.addresses = []
        self._clusters = weakref.WeakSet()  # closed first by close (`serving`)
        self._names = [f"local-{index}" for index in range(nodes)]
        level = getattr(logging, loglevel.upper(), logging.WARNING)
        worker = {
            "cls": distributed.Nanny,
            "options": {
                "host": "127.0.0.1",
                "nthreads": cpus,
                "dashboard": False,
                "silence_logs": level,
                "preload": [__name__],
            },
        }
        scheduler = {
            "cls": distributed.Scheduler,
            "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
        }
        make_cluster: Any = distributed.SpecCluster  # untyped constructor
        try:
            self.cluster: Any = make_cluster(
                workers={name: worker for name in self._names},
                scheduler=scheduler,
                silence_logs=level,
                name="dispynb-local",
            )
        except Exception as exc:
            raise ClusterError(f"the local Dask cluster did not start: {exc}") from exc
        try:
            self.cluster.wait_for_workers(nodes, timeout=START_TIMEOUT)
        except Exception as exc:
            self.close()
            raise ClusterError(
                f"the local Dask workers did not start in {START_TIMEOUT} s: {exc}"
            ) from exc
        by_name = {name: address for address, name in self._workers().items()}
        self.addresses = [_host_port(by_name[name]) for name in self._names]
        #: The engine a `JobCluster(nodes=this)` runs on.
        self.engine: DaskEngine = DaskEngine(self.cluster)

    def _workers(self) -> dict[str, str]:
        """``{address: name}`` of the workers connected to the scheduler now."""
        info = self.cluster.scheduler_info.get("workers", {})
        return {address: str(w.get("name")) for address, w in info.items()}

    @property
    def scheduler_address(self) -> str:
        """The Dask scheduler's address (``tcp://127.0.0.1:PORT``)."""
        return str(self.cluster.scheduler_address)

    def node_specs(self) -> list[str]:
        """The workers' ``tcp://host:port`` addresses."""
        return sorted(self._workers())

    @property
    def pids(self) -> list[int]:
        """Process ids of the Dask worker processes, in the order of their names."""
        pids = []
        for name in self._names:
            nanny = self.cluster.workers.get(name)
            process = getattr(nanny, "process", None)
            pid = getattr(process, "pid", None)
            if pid:
                pids.append(int(pid))
        return pids

    def exited(self) -> list[str]:
        """The names of the workers no longer connected to the scheduler (Dask's
        nanny restarts a worker that died; it is listed until it is back)."""
        if getattr(self, "cluster", None) is None:
            return list(self._names)
        present = set(self._workers().values())
        return [
            f"{host}:{port} ({name} exited)"
            for name, (host, port) in zip(self._names, self.addresses, strict=False)
            if name not in present
        ]

    def close(self) -> None:
        """Stop the workers and the scheduler (the clusters still open on them
        first, as `LocalCluster.close`); idempotent."""
        self._close_clusters()
        cluster = getattr(self, "cluster", None)
        self.cluster = None
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=START_TIMEOUT)

    def __repr__(self) -> str:
        if getattr(self, "cluster", None) is None:
            return f"<LocalCluster engine=dask closed cpus={self.cpus}>"
        return (
            f"<LocalCluster engine=dask scheduler={self.scheduler_address} "
            f"nodes={self._names} cpus={self.cpus}>"
        )
