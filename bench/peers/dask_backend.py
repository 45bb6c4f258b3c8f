"""Dask distributed as a benchmark backend.

A `distributed.LocalCluster` with W worker processes of one thread each
(``processes=True``, ``threads_per_worker=1``), scheduler and workers on 127.0.0.1,
no dashboard, and a `distributed.Client` on it. Every job is one ``client.submit``
with ``pure=False`` (no deduplication of identical calls); results come back with
``client.gather``. Functions from ``__main__`` travel by value (cloudpickle).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

from backends import Task


class DaskBackend:
    """Dask: ``LocalCluster(n_workers=W, threads_per_worker=1, processes=True)``."""

    name = "dask"

    def __init__(self, workers: int) -> None:
        import distributed  # imported before the start-up clock starts

        self._distributed = distributed
        self.workers = workers
        self._cluster: Any = None
        self._client: Any = None
        # W4 sends 10 MB arguments on purpose; the advice to scatter them is noise.
        warnings.filterwarnings("ignore", message=".*[Ss]ending large graph.*")
        warnings.filterwarnings("ignore", message=".*[Ll]arge object.*")
        logging.getLogger("distributed").setLevel(logging.ERROR)

    def start(self) -> None:
        self._cluster = self._distributed.LocalCluster(
            n_workers=self.workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        self._client = self._distributed.Client(self._cluster)
        self._client.wait_for_workers(self.workers)

    def submit_and_wait(
        self, fn: Task, arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        submit = self._client.submit
        futures = [submit(fn, *args, pure=False) for args in arglists]
        results: list[Any] = self._client.gather(futures)
        return results

    def share(self, fn: Task, obj: Any) -> Any:
        """W7: ``scatter(broadcast=True)``; jobs get the future."""
        return self._client.scatter(obj, broadcast=True)

    def round_trip(self, fn: Task, arg: Any) -> Any:
        return self._client.submit(fn, arg, pure=False).result()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def describe(self) -> dict[str, Any]:
        import dask

        return {
            "version": f"distributed {self._distributed.__version__}"
            f" (dask {dask.__version__})",
            "config": f"LocalCluster(n_workers={self.workers}, threads_per_worker=1,"
            " processes=True, host='127.0.0.1', dashboard_address=None);"
            " client.submit(pure=False) per job",
        }
