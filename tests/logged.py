"""What a script that set up no logging shows on stderr: dispynb logs there at INFO, as
dispy's does, one ``<date> <time> <logger> <LEVEL> <message>`` line per record."""

from __future__ import annotations

import re

LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (dispynb(?:\.\S+)?) ([A-Z]+) (.*)"
)


def logged_messages(stderr: str, level: str = "WARNING") -> list[str]:
    """The messages of ``stderr``'s lines, each of which must be a dispynb log record
    at ``level`` (anything else on stderr fails the test that calls this)."""
    records = [LOG_LINE.fullmatch(line) for line in stderr.splitlines()]
    assert all(r and r.group(2) == level for r in records), stderr
    return [r.group(3) for r in records if r]
