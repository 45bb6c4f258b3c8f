"""Errors of the notebook layer that IPython shows as one or two lines.

IPython prints an exception that has a ``_render_traceback_`` method with the lines
that method returns instead of its traceback. A magic that could not run, or a run
that was stopped, is not a bug in the user's code: the frames (dispynb's own, and
IPython's) would only hide the one line that says what happened and what to do.
Outside IPython these are ordinary exceptions with the same message.
"""

from __future__ import annotations

from typing import Any

from dispynb.errors import DispynbError

__all__ = ["MagicError", "MagicInterrupted", "RunInterrupted"]

_RED = "\x1b[0;31m"
_RESET = "\x1b[0m"


def _render(name: str, message: str) -> list[str]:
    first, *rest = message.splitlines() or [""]
    return [f"{_RED}{name}{_RESET}: {first}", *rest]


class MagicError(DispynbError):
    """``%dispy`` or ``%%dispy`` could not do what was asked (e.g. no node answers);
    the message says why and how to fix it."""

    def _render_traceback_(self) -> list[str]:
        return _render("dispynb", str(self))


class RunInterrupted(KeyboardInterrupt):
    """A waiting run was interrupted (Stop button, Ctrl-C) after cancelling its
    unfinished jobs; the message counts what was cancelled. The nodes stay up.

    ``run`` is the stopped `dispynb.Run` (None if none began): what finished keeps
    its results there, since the interrupted call never returned it.
    """

    def __init__(self, message: str = "", run: Any = None) -> None:
        super().__init__(message)
        self.run = run

    def _render_traceback_(self) -> list[str]:
        return _render("KeyboardInterrupt", str(self))


class MagicInterrupted(KeyboardInterrupt):
    """A ``%dispy`` line was interrupted (Stop button, Ctrl-C) while it started or
    reached nodes; the message says which nodes are in use now."""

    def _render_traceback_(self) -> list[str]:
        return _render("KeyboardInterrupt", str(self))
