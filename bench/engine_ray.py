"""dispynb on Ray, as a benchmark backend (issue 14 item 5).

"dispynb on Ray" is dispy's API (`dispynb.JobCluster`) with ``engine=RayEngine()`` on
exactly the Ray instance the raw Ray row measures: ``ray.init(num_cpus=W,
include_dashboard=False, _node_ip_address='127.0.0.1')`` in the driver process (the
engine uses the connection it finds). Its numbers beside raw Ray's, from the same
run, are dispynb's overhead on that engine. It runs with the project's interpreter,
which has the same ``ray`` release as the Ray peer's environment
(`venvs.REQUIREMENTS`).
"""

from __future__ import annotations

from typing import Any

from backends import DispynbBackend
from peers.ray_backend import import_ray, start_ray


class DispynbRayBackend(DispynbBackend):
    """dispynb's `JobCluster` on a local Ray instance (raw Ray's configuration)."""

    name = "dispynb-ray"
    map_calls = None  # W8 is dispynb's node servers against ProcessPoolExecutor
    journal_round = None  # W9 is dispynb's own nodes, with and without it
    #: Seconds W4 waits before each timed repetition: Ray frees the previous one's
    #: arguments asynchronously (`workloads.Bandwidth`); the same for both Ray rows.
    release_wait = 1.0

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._ray = import_ray()
        from dispynb.backends import ray as _engine  # noqa: F401

        self._engine: Any = None

    def start(self) -> None:
        from dispynb.backends.ray import RayEngine

        start_ray(self._ray, self.workers)
        self._engine = RayEngine()

    def close(self) -> None:
        super().close()
        self._engine = None
        if self._ray.is_initialized():
            self._ray.shutdown()

    def describe(self) -> dict[str, Any]:
        import dispynb

        return {
            "version": f"dispynb {dispynb.__version__} on ray {self._ray.__version__}",
            "config": f"JobCluster(fn, engine=RayEngine()) on ray.init(num_cpus="
            f"{self.workers}, include_dashboard=False, _node_ip_address='127.0.0.1'),"
            " one JobCluster per function (one actor per CPU); W4 waits"
            f" {self.release_wait:g} s before each repetition (Ray frees late)",
        }

    def _cluster_options(self) -> dict[str, Any]:
        if self._engine is None:
            raise RuntimeError(f"{type(self).__name__}.start() was not called")
        return {"engine": self._engine}
