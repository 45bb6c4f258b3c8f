"""``dispynb.logger``: the package's logger, with dispy's level attributes.

dispy programs pass ``loglevel=dispy.logger.DEBUG`` and call ``dispy.logger.info``;
this is the standard ``logging`` logger named ``dispynb`` with those attributes added.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("dispynb")
# (WARN and FATAL: dispy's logger, pycos's, names those levels so too)
for _level in ("DEBUG", "INFO", "WARN", "WARNING", "ERROR", "FATAL", "CRITICAL"):
    setattr(logger, _level, getattr(logging, _level))


class _UntilConfigured(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, for a program that had set up no logging when its cluster started:
    silent once the root logger has a handler (``logging.basicConfig`` called
    after ``JobCluster()``), which then shows dispynb's records: no line twice."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def set_level(level: int) -> None:
    """Set the ``dispynb`` loggers' level (``JobCluster(loglevel=...)``); with no
    handler configured anywhere, log to stderr."""
    root = logging.getLogger("dispynb")
    root.setLevel(level)
    if not root.handlers and not logging.getLogger().handlers:
        handler = _UntilConfigured()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
        )
        root.addHandler(handler)


def default_level() -> None:
    """dispy's default, ``JobCluster(loglevel=logging.INFO)``, for a program that
    set up no logging: its ``dispy.logger.info(...)`` lines and dispynb's own few
    at INFO go to stderr, as dispy's went. A program that did (a handler on the
    root logger or on ``dispynb``, or a level on ``dispynb``) keeps its choice, and
    a notebook, which shows what matters in its cells, gets no such handler."""
    own = logging.getLogger("dispynb")
    if own.level != logging.NOTSET or own.handlers or logging.getLogger().handlers:
        return
    if "ipykernel" in sys.modules:
        return
    set_level(logging.INFO)
