"""``python -m nodeserver`` and ``dispynb-node``: run a node server.

Stop signals are held (`dispynb.startup`) before the node's modules are imported,
which takes a second on a loaded machine: a SIGTERM meanwhile ends it cleanly."""

import sys

from dispynb._version import answered_version
from dispynb.startup import StartupSignals, run_held


def _run(held: StartupSignals) -> int:
    from nodeserver.cli import main as node_main

    return node_main()


def main() -> int:
    """The ``dispynb-node`` program."""
    if answered_version("dispynb-node", sys.argv[1:]):
        return 0
    return run_held("dispynb-node", _run)


if __name__ == "__main__":
    sys.exit(main())
