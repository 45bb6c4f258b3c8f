"""``submit_node`` through a shared scheduler, as dispy's SharedJobCluster has it: the
job runs on the node named and on no other, even with the other idle; a node the
cluster does not run on gets no job (None, logged); a job pinned to a node that is
lost ends ``Abandoned``, also for a reentrant computation (it may run nowhere else),
as with a `JobCluster`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from dispynb import DispyNode, LocalCluster, SharedJobCluster
from dispynb.errors import ClusterError
from dispynb.job import JobStatus
from dispynb.protocol import serialize
from dispynb.protocol.messages import (
    ABANDONED,
    ComputationSetup,
    Error,
    JobResults,
    JobSubmit,
)
from dispynb.protocol.records import ResultEntry
from tests.jobs import wait_until
from tests.sharedsched.harness import SchedulerProcess, raw_scheduler_session
from tests.sharedsched.nodeuse import by_name, where

pytestmark = pytest.mark.slow

WAIT = 20.0


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


async def _pinned_raw(port: int, credential: Path, pins: list[Any]) -> list[Any]:
    """As a user's own raw client: set a computation up, wait for it to be ready,
    send one job pinned by ``pins``; what comes back (an Error, or its results)."""
    conn = await raw_scheduler_session(port, credential)
    try:
        bundle = serialize.dumps({"func": abs, "setup": None, "setup_args": ()})
        conn.write(ComputationSetup(comp_id=1, name="pinned", workers=1), bundle)
        async with asyncio.timeout(WAIT):
            while (await conn.recv())[0].op != "computation-ready":
                pass
            conn.write(
                JobSubmit(comp_id=1, jobs=[[1, 0, 1]], pins=pins),
                serialize.dumps(((-3,), {})),
            )
            while True:
                answer, _ = await conn.recv()
                if isinstance(answer, Error | JobResults) and (
                    not isinstance(answer, JobResults) or answer.results
                ):
                    return [answer]
    finally:
        conn.close()


def test_the_scheduler_refuses_a_malformed_pin_and_ends_one_to_no_node(
    scheduler: SchedulerProcess, users: dict[str, Path]
) -> None:
    """What a client may send no scheduler takes on trust: a pin that is no
    ``[key, node]`` is refused, saying so; a job pinned to a node the computation
    does not run on (gone since, or never one) ends Abandoned at once, saying why,
    instead of waiting for ever."""
    credential = users["alice"]
    [refused] = asyncio.run(_pinned_raw(scheduler.port, credential, [[1, 5]]))
    assert isinstance(refused, Error) and "malformed job pin" in refused.message
    [ended] = asyncio.run(
        _pinned_raw(scheduler.port, credential, [[1, "no-such-node:9711"]])
    )
    assert isinstance(ended, JobResults)
    entry, _ = ResultEntry.from_wire(ended.results[0])
    assert entry.key == 1 and entry.outcome == ABANDONED
    assert "does not run this computation" in entry.exception
    assert "Traceback" not in scheduler.log_text()


def test_submit_node_to_a_node_closed_allocated_again_then_lost_returns_none(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A node the cluster closed (close_node), allocated again, set up again and
    then lost is none of the cluster's nodes: submit_node to it returns None,
    logged, as for any node gone. It took the job, as for a node still being
    set up again, and the job waited for a node that was gone."""
    first, second = nodes.names
    with SharedJobCluster(
        where, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as cluster:
        wait_until(lambda: sorted(by_name(cluster)) == [first, second])
        assert cluster.close_node(first) == 0
        wait_until(lambda: first not in by_name(cluster))
        assert cluster.allocate_node(first) == 0
        wait_until(lambda: first in by_name(cluster))
        assert cluster.submit_node(first, 0.0)() == first
        os.kill(nodes.pids[0], signal.SIGKILL)
        wait_until(lambda: first not in by_name(cluster), timeout=WAIT)
        with caplog.at_level(logging.WARNING, logger="dispynb"):
            assert cluster.submit_node(first, 0.0) is None
        assert f"submit_node: {first!r} is not a node of this cluster" in caplog.text
        assert cluster.node_jobs(first) == []
        assert cluster.submit(0.0)() == second


def test_node_methods_of_a_closed_cluster_say_it_is_closed(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After close, a node the cluster had closed (close_node) is managed no
    more: -1, saying the cluster is closed, node_jobs ``[]`` (dispy's
    SharedJobCluster's), submit_node as submit. They raised RuntimeError
    ("run_sync() called on a released LoopRunner")."""
    first, second = nodes.names
    with SharedJobCluster(
        where, scheduler_host=scheduler.address, secret_file=str(users["alice"])
    ) as cluster:
        wait_until(lambda: sorted(by_name(cluster)) == [first, second])
        assert cluster.close_node(first) == 0
    with caplog.at_level(logging.WARNING, logger="dispynb"):
        for method in ("allocate_node", "deallocate_node", "close_node"):
            assert getattr(cluster, method)(first) == -1
        assert cluster.set_node_cpus(first, 1) == -1
    assert caplog.messages == [
        f"{method}: the cluster is closed"
        for method in (
            "allocate_node",
            "deallocate_node",
            "close_node",
            "set_node_cpus",
        )
    ], caplog.text
    assert cluster.node_jobs(first) == []
    with pytest.raises(ClusterError, match="this cluster is closed"):
        cluster.submit_node(first, 0.0)
