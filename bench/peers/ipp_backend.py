"""ipyparallel as a benchmark backend.

``ipp.Cluster(n=W)`` starts a controller and W engines as local processes, the
controller listening on 127.0.0.1 only (ipyparallel's default); its profile and
connection files go to a private ``IPYTHONDIR`` so nothing is written to ``~``.
Every job is one ``apply_async`` on a load-balanced view; results come back with
``get()``. Functions use ipyparallel's default serialization ("canning": code,
defaults and closure cells; globals are looked up on the engine), no
``use_cloudpickle()``: that is what W6 tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

from backends import Task


class IpyparallelBackend:
    """ipyparallel: a local controller, W engines and a load-balanced view."""

    name = "ipyparallel"

    def __init__(self, workers: int) -> None:
        self._ipython_dir = tempfile.mkdtemp(prefix="bench-ipp-")
        os.environ["IPYTHONDIR"] = self._ipython_dir
        os.environ.setdefault("IPP_NONINTERACTIVE", "1")
        import ipyparallel  # imported before the start-up clock starts

        self._ipp = ipyparallel
        self.workers = workers
        self._cluster: Any = None
        self._client: Any = None
        self._view: Any = None

    def start(self) -> None:
        self._cluster = self._ipp.Cluster(
            n=self.workers, controller_ip="127.0.0.1", log_level=40
        )
        self._client = self._cluster.start_and_connect_sync(activate=False)
        self._client.wait_for_engines(self.workers, timeout=120)
        self._view = self._client.load_balanced_view()

    def submit_and_wait(
        self, fn: Task, arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        apply = self._view.apply_async
        results = [apply(fn, *args) for args in arglists]
        return [result.get() for result in results]

    def round_trip(self, fn: Task, arg: Any) -> Any:
        return self._view.apply_async(fn, arg).get()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.stop_cluster_sync()
            self._cluster = None
        shutil.rmtree(self._ipython_dir, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        return {
            "version": self._ipp.__version__,
            "config": f"Cluster(n={self.workers}, controller_ip='127.0.0.1');"
            " load_balanced_view().apply_async per job",
        }
