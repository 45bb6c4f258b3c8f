"""The names of a Dask cluster's workers as dispynb's nodes, on workers started the
way a Dask user starts them (``dask worker SCHEDULER``, no ``--name``), in a
namespace host made by the test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.netns import Network, run_client, unavailable_reason

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(150)]

pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def net() -> Iterator[Network]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Network(1).running() as network:
        yield network


UNNAMED_WORKERS = """
import contextlib
import io
import logging
import subprocess
import sys

from distributed import Client, LocalCluster

import dispynb
from dispynb.backends.dask import DaskEngine


def where(n):
    return dispy_node_name


def main(args):
    logging.getLogger("distributed").setLevel(logging.ERROR)
    with LocalCluster(
        n_workers=0, host="127.0.0.1", dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as scheduler:
        workers = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker",
             scheduler.scheduler_address, "--nworkers", "2", "--nthreads", "1",
             "--no-dashboard"],
            stderr=subprocess.DEVNULL,
        )
        try:
            with Client(scheduler) as client:
                client.wait_for_workers(2, timeout=60)
                addresses = sorted(client.scheduler_info()["workers"])
            engine = DaskEngine(scheduler.scheduler_address)
            with dispynb.JobCluster(where, engine=engine) as cluster:
                jobs = [cluster.submit(n) for n in range(8)]
                cluster.wait()
                table = io.StringIO()
                with contextlib.redirect_stdout(table):
                    cluster.print_status()
                names = sorted(node.name for node in cluster.status().nodes)
                ran_on = sorted({job.result for job in jobs})
        finally:
            workers.terminate()
            workers.wait(30)
    return {
        "addresses": addresses, "names": names, "ran_on": ran_on,
        "rows": table.getvalue().splitlines()[3:5],
    }
"""


def test_unnamed_workers_are_told_apart_by_their_address(
    net: Network, tmp_path: Path
) -> None:
    """A worker without a name is named by its address, ``tcp://127.0.0.1:PORT``:
    every row of print_status read ``tcp://127.0.0.1`` (its 15 characters). The
    node's name, ``dispy_node_name`` in its jobs, is its ``HOST:PORT``."""
    out = run_client(net, net.hosts[0], tmp_path, UNNAMED_WORKERS, {}, timeout=130)
    expected = sorted(a.removeprefix("tcp://") for a in out["addresses"])
    assert len(expected) == 2
    assert out["names"] == expected
    assert set(out["ran_on"]) <= set(expected), out
    assert sorted(row.split("|")[0].strip() for row in out["rows"]) == expected
