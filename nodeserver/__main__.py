"""``python -m nodeserver``: run a node server."""

import sys

from nodeserver.cli import main

sys.exit(main())
