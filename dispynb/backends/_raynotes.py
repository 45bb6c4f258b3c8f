"""What Ray's driver prints into the program's stdout (a notebook's cell) that
dispynb says better: the raylet's paragraph for each worker that died running a
task ("A worker died or was killed while executing a task by an unexpected system
error ... the OOM killer ... ray stop --force ..."). For dispynb's actors that is a
job whose process ended (``os._exit``, a fatal signal, a Stop's kill), which the
job's outcome already tells under its input, with the reason; the paragraph goes
to the ``dispynb.backends.ray`` logger instead, at DEBUG (a script's default INFO
on stderr would print it again). Ray's other messages (a task that
cannot be scheduled, a node removed...) are printed as before."""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["route_worker_deaths"]

logger = logging.getLogger("dispynb.backends.ray")

#: How the raylet's paragraph about a dead worker begins (Ray 2.x).
WORKER_DIED = "A worker died or was killed while executing a task"


def route_worker_deaths() -> None:
    """Have the driver's error listener (``ray._private.worker``, which looks its
    printer up at each message) log the raylet's dead-worker paragraphs instead
    of printing them. Idempotent; nothing if this Ray has no such printer."""
    module = sys.modules.get("ray._private.worker")
    printer = getattr(module, "print_to_stdstream", None)
    if printer is None or getattr(printer, "dispynb_routed", False):
        return

    def print_or_log(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        lines = [str(line) for line in data.get("lines") or ()]
        raylet = data.get("pid") == "raylet" and bool(lines)
        if raylet and all(line.startswith(WORKER_DIED) for line in lines):
            for line in lines:
                logger.debug("Ray: %s", line)
            return
        printer(data, ignore_prefix=ignore_prefix)

    print_or_log.dispynb_routed = True  # type: ignore[attr-defined]
    module.print_to_stdstream = print_or_log  # type: ignore[union-attr]
