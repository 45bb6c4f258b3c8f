"""How the daemons' and launchers' messages say a count: ``1 CPU``, ``2 CPUs``,
and a size: ``3.2 GB``.

Log lines and command output an administrator reads (``serving 1 CPU on ...``,
``served 1 client (--serve)``) say a count with its noun in the right number.
The notebook displays (`dispynb.reprs`) say sizes the same way; a node says them
from here, without the HTML module and its tables (0.25 MiB of every node's image).
"""

from __future__ import annotations

__all__ = ["counted", "format_bytes"]


def counted(count: int, noun: str, plural: str = "") -> str:
    """``count`` and ``noun``, which is plural (``plural``, or ``noun`` + "s")
    unless ``count`` is 1: ``counted(1, "CPU")`` is ``'1 CPU'``."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def format_bytes(count: float | None) -> str:
    """``'3.2 GB'``; ``'-'`` if unknown."""
    if count is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GB"
