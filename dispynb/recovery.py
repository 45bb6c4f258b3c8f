"""``recover_jobs``: dispy's recovery of a crashed client's jobs.

dispy keeps a journal in ``recover_file`` and asks the nodes for results of jobs that
finished while the client was gone. dispynb's durable journal (and the nodes keeping
finished results for a while) is not built yet, so this function says so plainly
instead of returning nothing.
"""

from __future__ import annotations

import os
from typing import Any

from dispynb.errors import ClusterError, ConfigurationError


def recover_jobs(
    recover_file: str | None = None,
    timeout: float | None = None,
    terminate_pending: bool = False,
) -> list[Any]:
    """Recover the jobs of a client that crashed (dispy's signature).

    Raises
    ------
    ConfigurationError
        If ``recover_file`` does not exist.
    ClusterError
        Always otherwise, for now: dispynb does not yet keep the journal that recovery
        needs. Results of a crashed client cannot be recovered yet.
    """
    if recover_file is not None and not os.path.exists(recover_file):
        raise ConfigurationError(f"recover_file {recover_file!r} does not exist")
    raise ClusterError(
        "recovering a crashed client's jobs is not available yet in dispynb: no "
        "journal is kept, so results of jobs that ran while the client was gone are "
        "lost; resubmit those jobs"
    )
