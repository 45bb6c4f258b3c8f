"""What the Executor tests share: calls that hold until released, and quick ones.

Module-level functions: the local nodes import this module (the repository is on
their path), as they do `tests.jobs`.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import time
from pathlib import Path

from dispynb.executor import Executor
from tests.jobs import WAIT, wait_for_path, wait_until


def mul(x: int, y: int) -> int:
    return x * y


def hold(marker: str, release: str, value: object = None) -> object:
    """Write ``marker``, then wait (at most WAIT s) until ``release`` exists; then
    write ``marker.ended`` (a terminated call never writes it)."""
    Path(marker).touch()
    deadline = time.monotonic() + WAIT
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.005)
    Path(f"{marker}.ended").touch()
    return value


def send_ahead(executor: Executor) -> None:
    """Run quick calls first: a node then sends the next jobs ahead to its busy
    workers (it does so only for short jobs), where they wait behind the running
    ones, and only the worker can tell whether one started."""
    assert list(executor.map(mul, range(20), range(20))) == [i * i for i in range(20)]


def ended(path: Path) -> list[Path]:
    """The calls of `hold` under ``path`` that returned."""
    return sorted(path.glob("*.ended"))


class Gate:
    """Jobs that start (a marker each) and hold until `open`."""

    def __init__(self, path: Path) -> None:
        self.dir = path
        self.release = str(path / "release")
        self.count = itertools.count()

    def submit(self, executor: Executor, value: object = None) -> cf.Future:
        marker = str(self.dir / f"started-{next(self.count)}")
        future = executor.submit(hold, marker, self.release, value)
        future.marker = marker  # type: ignore[attr-defined]
        return future

    def started(self, future: cf.Future) -> None:
        wait_for_path(future.marker)  # type: ignore[attr-defined]
        wait_until(future.running)  # the node reported the start

    def open(self) -> None:
        Path(self.release).touch()
