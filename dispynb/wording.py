"""How the daemons' and launchers' messages say a count: ``1 CPU``, ``2 CPUs``.

Log lines and command output an administrator reads (``serving 1 CPU on ...``,
``served 1 client (--serve)``) say a count with its noun in the right number.
"""

from __future__ import annotations

__all__ = ["counted"]


def counted(count: int, noun: str, plural: str = "") -> str:
    """``count`` and ``noun``, which is plural (``plural``, or ``noun`` + "s")
    unless ``count`` is 1: ``counted(1, "CPU")`` is ``'1 CPU'``."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
