"""What dispynb's daemons share on their command line: logging and exit codes.

``dispynb-node`` (`nodeserver.cli`) and ``dispynb-scheduler`` (`schedserver.cli`)
set their logging up alike and end alike: a setting that cannot work exits 2 and
any other dispynb error or a socket that cannot be opened exits 1, each with one
line on stderr naming the program. (The client library never imports the
daemons; they import this.)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from dispynb.errors import ConfigurationError, DispynbError

#: Log line layout of the daemons.
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def setup_logging(debug: bool, level: str) -> None:
    """Log to stderr at ``level`` (``-d``: DEBUG)."""
    logging.basicConfig(level="DEBUG" if debug else level.upper(), format=LOG_FORMAT)


def run_daemon(prog: str, run: Callable[[], int]) -> int:
    """``run()``'s exit code, or the code and one stderr line for its error."""
    try:
        return run()
    except ConfigurationError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except DispynbError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{prog}: cannot start: {exc}", file=sys.stderr)
        return 1


__all__ = ["LOG_FORMAT", "run_daemon", "setup_logging"]
