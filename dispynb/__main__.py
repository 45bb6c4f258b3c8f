"""``python -m dispynb``: the ``dispynb`` command (``demo``, ``run``, ``secret``,
``version``), for an environment whose scripts directory is not on ``PATH``."""

import sys

from dispynb.cli import main

if __name__ == "__main__":
    sys.exit(main())
