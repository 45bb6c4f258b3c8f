"""``dispynb.logger``: the package's logger, with dispy's level attributes.

dispy programs pass ``loglevel=dispy.logger.DEBUG`` and call ``dispy.logger.info``;
this is the standard ``logging`` logger named ``dispynb`` with those attributes added.

A cluster made in a program that set up no logging writes dispynb's lines to stderr
(dispy's logger, pycos's own, wrote its lines to stdout: here they stay out of the
program's output), at dispy's default level, INFO, or at ``loglevel=``.
That lasts only while the program sets up none. Once it adds a handler to the root
logger (``logging.basicConfig()``, ``dictConfig``) its set-up decides, as if made
before the cluster: dispy's default INFO gives way to the program's levels, and no
line is shown twice. A handler it adds to ``dispynb`` itself takes over the lines at
the cluster's level (a ``loglevel`` of its own sets another), in whichever order the
two were made.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("dispynb")
# (WARN and FATAL: dispy's logger, pycos's, names those levels so too)
for _level in ("DEBUG", "INFO", "WARN", "WARNING", "ERROR", "FATAL", "CRITICAL"):
    setattr(logger, _level, getattr(logging, _level))


class _UntilConfigured(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr for ``dispynb``'s records while the program has set up no logging.

    Silent while the program has a handler of its own on ``dispynb``, which shows
    the records. ``provisional``: the level is dispy's default, not the program's
    ``loglevel``, and ``dispynb`` does not propagate meanwhile, so that a root
    handler added later never sees a record let through at that default: the
    first record after it hands over (`_hand_over`).
    """

    def __init__(self, provisional: bool) -> None:
        super().__init__()
        self.provisional = provisional

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            if self.provisional:
                self._hand_over(record)
            return
        if any(handler is not self for handler in logger.handlers):
            return
        super().emit(record)

    def _hand_over(self, record: logging.LogRecord) -> None:
        """The program configured logging: its levels decide from now on, this
        record's passage up to the root logger included."""
        if logger.level == logging.INFO:  # dispy's default, set by default_level
            logger.setLevel(logging.NOTSET)  # (and forgets every logger's cache)
        if not logging.getLogger(record.name).isEnabledFor(record.levelno):
            # Not for the program's handlers. dispynb stays unpropagated until a
            # record that is: only one let through at the old level reaches here.
            return
        # logging's loop over the handlers reads propagate after this one, and
        # iterates the old list: this record goes on up, once.
        logger.propagate = True
        logger.handlers = [h for h in logger.handlers if h is not self]
        self.provisional = False


class _Held:
    """``dispynb.propagate`` while dispy's default INFO is provisional: false while
    the cluster's provisional stderr handler is on ``dispynb``, true once something
    removed it.

    ``logging.config.dictConfig`` naming ``dispynb`` without ``propagate`` (to set
    its level, say) removes that handler and leaves ``propagate`` as it found it:
    a plain ``False`` would then keep every dispynb record from the program's root
    handlers for good. A ``propagate`` the set-up gives replaces this object.
    """

    def __bool__(self) -> bool:
        ours = _ours()
        return ours is None or not ours.provisional


def _ours() -> _UntilConfigured | None:
    return next((h for h in logger.handlers if isinstance(h, _UntilConfigured)), None)


def _add_handler(provisional: bool) -> None:
    handler = _UntilConfigured(provisional)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    )
    logger.addHandler(handler)


def set_level(level: int) -> None:
    """Set the ``dispynb`` loggers' level (``JobCluster(loglevel=...)``); while no
    handler is configured anywhere, log to stderr."""
    logger.setLevel(level)
    ours = _ours()
    if ours is not None:  # the program's level now, not dispy's default
        ours.provisional = False
        logger.propagate = True
    elif not logger.handlers and not logging.getLogger().handlers:
        _add_handler(provisional=False)


def default_level() -> None:
    """dispy's default, ``JobCluster(loglevel=logging.INFO)``, for a program that
    configured no logging: its ``dispy.logger.info(...)`` lines and dispynb's own few
    at INFO are shown (on stderr), as dispy's were, until it does (see the
    module's docstring). A program with a root handler keeps its set-up; one that
    set a level on ``dispynb`` alone (``dispy.logger.setLevel(...)`` before the
    cluster) keeps that level, its lines on stderr (Python showed none below
    WARNING; dispy's cluster reset its logger to INFO). A notebook, which shows
    what matters in its cells, gets no such handler."""
    if logging.getLogger().handlers or "ipykernel" in sys.modules:
        return
    if _ours() is not None:
        return
    if logger.level != logging.NOTSET:
        if not logger.handlers:
            _add_handler(provisional=False)
        return
    logger.setLevel(logging.INFO)
    logger.propagate = _Held()  # type: ignore[assignment]  # (logging reads it as a truth value)
    _add_handler(provisional=True)
