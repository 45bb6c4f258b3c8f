"""`SourceWarnings`: log lines about network sources that cannot flood the log.

Anyone can send a datagram, from any source address (an IPv6 /64 holds more than
a log can): a line about each source is logged once, for so many sources, then
one line says no more are.
"""

from __future__ import annotations

import logging


class SourceWarnings:
    """The sources a line was logged about: each once, for ``most`` of them; the
    first source past them gets ``full`` logged (at ``level``) instead, and the
    rest nothing."""

    def __init__(
        self, most: int, logger: logging.Logger, level: int, full: str
    ) -> None:
        self._most = most
        self._logger = logger
        self._level = level
        self._full = full
        self._said: set[str] = set()
        self._full_said = False

    def first(self, source: str) -> bool:
        """Whether to log the line about ``source`` now: the first time for it,
        while fewer than ``most`` sources had theirs."""
        if source in self._said:
            return False
        if len(self._said) >= self._most:
            if not self._full_said:
                self._full_said = True
                self._logger.log(self._level, self._full, self._most)
            return False
        self._said.add(source)
        return True


__all__ = ["SourceWarnings"]
