"""``python -m schedserver``: the ``dispynb-scheduler`` program."""

import sys

from schedserver.cli import main

sys.exit(main())
