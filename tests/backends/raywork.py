"""What the Ray tests (tests/backends/test_ray*.py) share: `wait_for`, and the
setup and cleanup computations (with the job that reads what setup left in its
globals: they must stay in one module, shipped by value together)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

#: Seconds any wait of these tests may take (Ray is slow on a loaded machine).
WAIT = 90.0


def wait_for(condition: Any, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def record_setup(folder: str) -> int:
    global STATE
    STATE = f"set up in {os.getpid()}"
    Path(folder, f"setup-{os.getpid()}").touch()
    return 0


def record_cleanup(folder: str) -> None:
    Path(folder, f"cleanup-{os.getpid()}").touch()


def uses_setup(n: int) -> tuple[int, str]:
    return n, STATE


STATE = ""
