"""A scheduler that serves clients for weeks: what a killed client leaves on its
nodes must go once its jobs have ended (its results stay kept for recover_jobs)."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from dispynb import LocalCluster, recover_jobs
from dispynb.job import JobStatus
from tests.sharedsched.harness import SchedulerProcess, kill_doomed_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _computation_processes(nodes: LocalCluster) -> list[int]:
    """The pids of the computation processes under the nodes, and of their
    workers (forked from them, of the same name)."""
    found = []
    for pid in nodes.pids:
        for process in psutil.Process(pid).children(recursive=True):
            try:
                if process.name() == "dispynb-compute":
                    found.append(process.pid)
            except psutil.NoSuchProcess:
                continue
    return found


def test_a_killed_clients_computation_leaves_the_nodes_once_its_jobs_end(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
    tmp_path: Path,
) -> None:
    """3 clients killed while their jobs run: once those jobs ended, no computation
    process is left on the nodes (before: each killed client's, with its workers
    and connections, stayed there idle for --keep_results, an hour by default: on
    a node of 64 CPUs, 65 processes and some 130 descriptors per killed client);
    each client's results are still collected once by recover_jobs."""
    journals = [tmp_path / f"client{n}.journal" for n in range(3)]
    for journal in journals:
        kill_doomed_client(scheduler.address, users["alice"], journal, tmp_path)
    scheduler.wait_for_log("client gone; its jobs go on", count=3)
    deadline = time.monotonic() + 30
    while (left := _computation_processes(nodes)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []
    for journal in journals:
        jobs = recover_jobs(str(journal), secret_file=str(users["alice"]), timeout=30)
        assert sorted(job.result for job in jobs) == [n * 10 for n in range(6)]
        assert all(job.status == JobStatus.Finished for job in jobs)
