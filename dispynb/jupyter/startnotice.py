"""`StartNotice`: a ``%%dispy`` cell says that its run is still starting.

A run starts once its nodes are connected and have run its ``--setup`` (a model
loading can take minutes); until then the cell has no progress bar, and a cell that
shows nothing for minutes reads as hung.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Callable
from typing import Any

from dispynb._interruptible import start_thread

__all__ = ["START_NOTICE", "StartNotice"]

#: Seconds a run may take to start before its cell says that it is starting.
START_NOTICE = 2.0


class StartNotice:
    """Write, once, that run ``label`` is starting (its nodes run ``setup``), unless
    `done` is called within ``delay`` seconds (its cluster is up, or its start
    failed)."""

    def __init__(
        self, label: str, setup: Callable[..., Any], delay: float = START_NOTICE
    ) -> None:
        name = getattr(setup, "__name__", repr(setup))
        self.text = (
            f"dispynb: run {label!r} is starting: its nodes are running its setup, "
            f"{name}, first\n"
        )
        self._lock = threading.Lock()
        self._done = False
        # In the cell's context: ipykernel sends what it writes to that cell.
        context = contextvars.copy_context()
        self._timer = threading.Timer(delay, context.run, (self._say,))
        self._timer.daemon = True
        start_thread(self._timer)

    def _say(self) -> None:
        with self._lock:
            if not self._done:
                sys.stderr.write(self.text)
                sys.stderr.flush()

    def done(self) -> None:
        """The run started (or will not): say nothing from now on."""
        with self._lock:
            self._done = True
        self._timer.cancel()
