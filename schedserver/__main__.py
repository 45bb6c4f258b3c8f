"""``python -m schedserver`` and ``dispynb-scheduler``: the scheduler program.

Stop signals are held (`dispynb.startup`) before its modules are imported: a
SIGTERM meanwhile ends it cleanly."""

import sys

from dispynb._version import answered_version
from dispynb.startup import StartupSignals, run_held


def _run(held: StartupSignals) -> int:
    from schedserver.cli import main as scheduler_main

    return scheduler_main()


def main() -> int:
    """The ``dispynb-scheduler`` program."""
    if answered_version("dispynb-scheduler", sys.argv[1:]):
        return 0
    return run_held("dispynb-scheduler", _run)


if __name__ == "__main__":
    sys.exit(main())
