"""dispyscheduler's ``--cluster_certfile``/``--cluster_keyfile``: clients reach the
scheduler over TLS (checking its certificate with ``cafile=``); a plain client is
refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import LocalCluster, SharedJobCluster
from dispynb.errors import DispynbError
from tests.sharedsched.harness import SchedulerProcess
from tests.transport.certs import make_cert

pytestmark = pytest.mark.slow


def test_clients_reach_the_scheduler_over_tls(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    cert, key = make_cert(tmp_path, "scheduler")
    sched = SchedulerProcess(
        tmp_path,
        nodes.node_specs(),
        nodes.secret,
        args=("--cluster_certfile", cert, "--cluster_keyfile", key),
    )
    sched.start()
    try:
        with SharedJobCluster(
            abs,
            scheduler_host=sched.address,
            secret_file=str(users["alice"]),
            cafile=cert,
        ) as cluster:
            assert cluster.submit(-3)() == 3
        with pytest.raises(DispynbError):
            SharedJobCluster(
                abs, scheduler_host=sched.address, secret_file=str(users["bob"])
            )
    finally:
        sched.stop()
