"""``submit_node`` through a shared scheduler, as dispy's SharedJobCluster has it: the
job runs on the node named and on no other, even with the other idle; a node the
cluster does not run on gets no job (None, logged); a job pinned to a node that is
lost ends ``Abandoned``, also for a reentrant computation (it may run nowhere else),
as with a `JobCluster`."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from dispynb import DispyNode, LocalCluster, SharedJobCluster
from dispynb.job import JobStatus
from tests.jobs import wait_until
from tests.sharedsched.harness import SchedulerProcess

pytestmark = pytest.mark.slow

WAIT = 20.0


def where(seconds: float) -> str:
    """Sleep, then say which node ran the job."""
    import time

    time.sleep(seconds)
    return dispy_node_name  # type: ignore[name-defined]  # noqa: F821


def by_name(cluster: SharedJobCluster) -> dict[str, DispyNode]:
    return {node.name: node for node in cluster.status().nodes}


def test_submit_node_runs_the_job_on_that_node_only(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = nodes.names
    with SharedJobCluster(
        where, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as cluster:
        wait_until(lambda: sorted(by_name(cluster)) == [first, second])
        target = by_name(cluster)[second]
        # Six jobs for the 2 CPUs of one node: they wait for it, the other node
        # (idle) takes none of them; by DispyNode, address or name alike.
        pinned = [cluster.submit_node(target, 0.2) for _ in range(2)]
        pinned += [cluster.submit_node(f"{target.ip_addr}:{target.port}", 0.2)]
        pinned += [cluster.submit_node(second, 0.2) for _ in range(2)]
        named = cluster.submit_job_id_node("mine", target, 0.2)
        assert named is not None and named.id == "mine"
        pinned.append(named)
        free = [cluster.submit(0.0) for _ in range(4)]  # not held up behind them
        for job in free:
            assert job() is not None
        for job in pinned:
            assert job is not None
            assert job() == second, (job.status, job.exception)
            assert job.ip_addr == target.ip_addr
        assert cluster.wait(timeout=WAIT)
        # Not a node of this cluster: no job, as dispy's (and said why).
        with caplog.at_level(logging.WARNING, logger="dispynb.cluster"):
            assert cluster.submit_node("no-such-node", 0.0) is None
            assert cluster.submit_node(scheduler.address, 0.0) is None
        assert "not a node of this cluster" in caplog.text


def test_jobs_pinned_to_a_lost_node_end_abandoned_even_reentrant(
    scheduler: SchedulerProcess, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    first, second = nodes.names
    with SharedJobCluster(
        where,
        scheduler_host=scheduler.address,
        secret_file=str(users["alice"]),
        reentrant=True,
    ) as cluster:
        wait_until(lambda: sorted(by_name(cluster)) == [first, second])
        lost = by_name(cluster)[first]
        # Two run there, two wait for its CPUs at the scheduler.
        pinned = [cluster.submit_node(lost, 30.0) for _ in range(4)]
        assert all(job is not None for job in pinned)
        wait_until(lambda: sum(job.status == JobStatus.Running for job in pinned) == 2)
        os.kill(nodes.pids[0], signal.SIGKILL)
        for job in pinned:
            assert job.finish.wait(WAIT)
            assert job.status == JobStatus.Abandoned, (job.status, job.exception)
            assert lost.ip_addr in str(job.exception)
        # The reentrant computation's other jobs still run, on the node left.
        assert cluster.submit(0.0)() == second


def sized(name: str) -> tuple[str, int]:
    """Say which node ran the job, and the size of its file ``name`` there."""
    import os

    return dispy_node_name, os.path.getsize(name)  # type: ignore[name-defined]  # noqa: F821


def test_cluster_status_submits_to_each_node_as_it_is_initialized(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """dispy's job_scheduler example through a scheduler: the cluster_status
    callback submits a job to each node as it is Initialized (submit_node with the
    DispyNode it is given, and the job's own file), and each runs there."""
    monkeypatch.chdir(tmp_path)
    Path("data000").write_bytes(b"x" * 1000)
    jobs: dict[str, Any] = {}
    lock = threading.Lock()

    def cluster_status(status: int, node: DispyNode | None, job: object) -> None:
        if status == DispyNode.Initialized and node is not None:
            submitted = cluster.submit_node(
                node, "data000", dispy_job_depends=["data000"]
            )
            with lock:
                jobs[node.name] = submitted

    cluster = SharedJobCluster(
        sized,
        scheduler_host=scheduler.address,
        secret_file=str(users["alice"]),
        cluster_status=cluster_status,
    )
    with cluster:
        wait_until(lambda: len(jobs) == 2)
        with lock:
            ran = {name: job() for name, job in jobs.items()}
    assert ran == {name: (name, 1000) for name in nodes.names}
