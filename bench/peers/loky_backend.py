"""loky (joblib's process pool) as a benchmark backend.

``loky.get_reusable_executor(max_workers=W, reuse=False)``: W worker processes
started by loky (its default ``loky`` start method, a spawn-like fresh interpreter);
functions from ``__main__`` travel by value with cloudpickle. Every job is one
``submit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backends import Task


class LokyBackend:
    """loky: a fresh reusable executor with W workers."""

    name = "loky"

    def __init__(self, workers: int) -> None:
        import loky  # imported before the start-up clock starts

        self._loky = loky
        self.workers = workers
        self._executor: Any = None

    def start(self) -> None:
        self._executor = self._loky.get_reusable_executor(
            max_workers=self.workers, reuse=False, timeout=3600
        )

    def submit_and_wait(
        self, fn: Task, arglists: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        submit = self._executor.submit
        futures = [submit(fn, *args) for args in arglists]
        return [future.result() for future in futures]

    def round_trip(self, fn: Task, arg: Any) -> Any:
        return self._executor.submit(fn, arg).result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def describe(self) -> dict[str, Any]:
        return {
            "version": self._loky.__version__,
            "config": f"get_reusable_executor(max_workers={self.workers},"
            " reuse=False); submit per job",
        }
