"""Client programs of the Dask engine's tests on a ``distributed.LocalCluster``.

`run` runs one (``main(args)``, after `PRELUDE`) in the namespace host of the
module's ``net`` (conftest.py) and returns what it returned, as JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dispynb.job import JobStatus
from tests.multihost.netns import Network, run_client

CREATED, RUNNING = int(JobStatus.Created), int(JobStatus.Running)
CANCELLED, TERMINATED = int(JobStatus.Cancelled), int(JobStatus.Terminated)
FINISHED = int(JobStatus.Finished)


def run(net: Network, tmp_path: Path, code: str, **args: Any) -> Any:
    """Run a client program (``main(args)``) in the namespace host; its result."""
    return run_client(net, net.hosts[0], tmp_path, PRELUDE + code, args, timeout=100)


PRELUDE = """
import logging
import os
import sys
import time

import dispynb
import dispynb.errors
from distributed import LocalCluster
from dispynb.backends.dask import DaskEngine

logging.getLogger("distributed").setLevel(logging.ERROR)


def local_cluster(workers=2):
    return LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True,
        host="127.0.0.1", dashboard_address=None, silence_logs=logging.ERROR,
    )
"""
