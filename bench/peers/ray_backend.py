"""Ray as a benchmark backend.

``ray.init(num_cpus=W, include_dashboard=False)`` starts a local Ray instance (GCS,
raylet, object store, W task workers) bound to 127.0.0.1; usage statistics are
disabled. Every job is one ``remote_fn.remote(*args)`` of a ``ray.remote`` wrapper of
the task function (one CPU per task, Ray's default); results come back with
``ray.get``. Large arguments go through Ray's shared-memory object store.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from backends import Task


def import_ray() -> Any:
    """``ray``, imported with its usage statistics and import warning off (before
    a row's start-up clock starts: both Ray rows import it so)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    import ray

    return ray


def start_ray(ray: Any, workers: int) -> None:
    """Start the local Ray instance both Ray rows measure: ``workers`` CPUs on
    127.0.0.1, no dashboard. On a loaded machine Ray's raylet may miss its fixed
    30 s to register: it is started again, at most three times."""
    for attempt in range(3):
        try:
            ray.init(
                num_cpus=workers,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
                configure_logging=False,
            )
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            ray.shutdown()


class RayBackend:
    """Ray: a local instance with W CPUs."""

    name = "ray"
    #: Seconds W4 waits before each timed repetition: Ray frees the previous one's
    #: arguments asynchronously (`workloads.Bandwidth`); the same for both Ray rows.
    release_wait = 1.0

    def __init__(self, workers: int) -> None:
        self._ray = import_ray()
        self.workers = workers
        self._remote: dict[Task, Any] = {}

    def start(self) -> None:
        start_ray(self._ray, self.workers)

    def _remote_for(self, fn: Task) -> Any:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self._ray.remote(fn)
        return remote

    def submit_and_wait(
        self, fn: Task, arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        remote = self._remote_for(fn).remote
        refs = [remote(*args) for args in arglists]
        results: list[Any] = self._ray.get(refs)
        return results

    def share(self, fn: Task, obj: Any) -> Any:
        """W7: ``ray.put``; jobs get the ObjectRef (Ray passes the object)."""
        return self._ray.put(obj)

    def round_trip(self, fn: Task, arg: Any) -> Any:
        return self._ray.get(self._remote_for(fn).remote(arg))

    def close(self) -> None:
        self._remote.clear()
        if self._ray.is_initialized():
            self._ray.shutdown()

    def describe(self) -> dict[str, Any]:
        return {
            "version": self._ray.__version__,
            "config": f"ray.init(num_cpus={self.workers}, include_dashboard=False,"
            " _node_ip_address='127.0.0.1'); f.remote() per job; W4 waits"
            f" {self.release_wait:g} s before each repetition (Ray frees late)",
        }
