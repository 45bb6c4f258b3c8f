"""dispynb on another engine, as benchmark backends (issue 14 item 5).

"dispynb on Dask" is dispy's API (`dispynb.JobCluster`) with
``engine=DaskEngine(...)`` on exactly the cluster the raw Dask row measures: a
`distributed.LocalCluster` with W worker processes of one thread each on 127.0.0.1.
Its numbers beside raw Dask's, from the same run, are dispynb's overhead on that
engine. It runs with the project's interpreter, which has the same ``distributed``
release as the Dask peer's environment (`venvs.REQUIREMENTS`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from backends import DispynbBackend


class DispynbDaskBackend(DispynbBackend):
    """dispynb's `JobCluster` on a Dask ``LocalCluster`` (raw Dask's configuration)."""

    name = "dispynb-dask"
    map_calls = None  # W8 is dispynb's node servers against ProcessPoolExecutor
    journal_round = None  # W9 is dispynb's own nodes, with and without it

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        import distributed  # imported before the start-up clock starts

        from dispynb.backends import dask  # noqa: F401

        self._distributed = distributed
        self._engine: Any = None
        warnings.filterwarnings("ignore", message=".*[Ss]ending large graph.*")
        warnings.filterwarnings("ignore", message=".*[Ll]arge object.*")
        logging.getLogger("distributed").setLevel(logging.ERROR)

    def start(self) -> None:
        from dispynb.backends.dask import DaskEngine

        cluster = self._stack.enter_context(
            self._distributed.LocalCluster(
                n_workers=self.workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
        )
        self._local = cluster
        self._engine = DaskEngine(cluster)

    def describe(self) -> dict[str, Any]:
        import dispynb

        return {
            "version": f"dispynb {dispynb.__version__} on distributed"
            f" {self._distributed.__version__}",
            "config": f"JobCluster(fn, engine=DaskEngine(LocalCluster(n_workers="
            f"{self.workers}, threads_per_worker=1, processes=True,"
            " host='127.0.0.1', dashboard_address=None))), one per function",
        }

    def _cluster_options(self) -> dict[str, Any]:
        if self._engine is None:
            raise RuntimeError(f"{type(self).__name__}.start() was not called")
        return {"engine": self._engine}
