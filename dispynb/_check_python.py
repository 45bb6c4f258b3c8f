"""Stop at ``import dispynb`` on a Python older than 3.11, saying so.

pip refuses to install dispynb there, but a checkout on ``PYTHONPATH`` (a node of a
shared home directory whose ``python3`` is older) went on to fail with ``cannot
import name 'Self' from 'typing'`` deep in the protocol. `dispynb` imports this
module first (it sorts before the others), so it must run on any Python 3.
"""

import sys

#: The oldest Python dispynb runs on (pyproject.toml's requires-python).
OLDEST = (3, 11)

if sys.version_info < OLDEST:
    raise ImportError(
        "dispynb needs Python {}.{} or newer; {} is Python {}.{}.{}: run it with a "
        "newer Python (nodes with the version of their clients)".format(
            *OLDEST, sys.executable, *sys.version_info[:3]
        )
    )
