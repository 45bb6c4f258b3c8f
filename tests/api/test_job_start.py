"""A job is Running (and its node busy) only while it executes on the node.

Nodes report when a job actually starts in a worker; a job sent to a node but waiting
there behind another stays Created, as in dispy, and ``job.start_time`` is when it
started on the node.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dispynb import DispyJob, DispyNode, JobCluster
from tests import jobs
from tests.jobs import WAIT, wait_for_path, wait_until


def test_job_waiting_on_its_node_is_not_running(local1, tmp_path: Path) -> None:
    events: list[tuple[int, object]] = []
    lock = threading.Lock()

    def cluster_status(status: int, node: DispyNode | None, job: DispyJob | None):
        if job is not None:
            with lock:
                events.append((status, job.id))

    with JobCluster(
        jobs.mark_and_hold, nodes=local1, cluster_status=cluster_status
    ) as cluster:
        first = cluster.submit_job_id(
            "first", str(tmp_path / "m1"), str(tmp_path / "r1")
        )
        second = cluster.submit_job_id(
            "second", str(tmp_path / "m2"), str(tmp_path / "r2")
        )
        wait_for_path(tmp_path / "m1")
        wait_until(lambda: first.status == DispyJob.Running)
        node = cluster.status().nodes[0]
        # The second job was sent to the node ahead of time, but it waits there.
        assert second.status == DispyJob.Created
        assert node.busy == 1
        assert not (tmp_path / "m2").exists()
        assert first.submit_time <= first.start_time <= time.time()

        (tmp_path / "r1").touch()
        wait_for_path(tmp_path / "m2")
        wait_until(lambda: second.status == DispyJob.Running)
        assert first.status == DispyJob.Finished
        assert node.busy == 1
        # start_time is when the job started on the node, not when it was sent.
        assert second.start_time >= first.end_time - 0.5
        (tmp_path / "r2").touch()
        assert cluster.wait(timeout=WAIT)
        assert node.busy == 0
        assert abs(second.start_time - second.result) < 0.5
    with lock:
        seen = list(events)
    order = [status for status, job_id in seen if job_id == "second"]
    assert order == [DispyJob.Created, DispyJob.Running, DispyJob.Finished]
    # Node order: the first job ended before the second started.
    assert seen.index((DispyJob.Finished, "first")) < seen.index(
        (DispyJob.Running, "second")
    )


def test_busy_counts_executing_jobs_only(local, tmp_path: Path) -> None:
    with JobCluster(jobs.mark_and_hold, nodes=local) as cluster:
        held = [
            cluster.submit(str(tmp_path / f"m{i}"), str(tmp_path / "release"))
            for i in range(5)
        ]
        node = cluster.status().nodes[0]
        wait_until(lambda: sum(j.status == DispyJob.Running for j in held) == 2)
        assert node.busy == 2  # the node's 2 CPUs; three jobs wait
        assert sum(j.status == DispyJob.Created for j in held) == 3
        (tmp_path / "release").touch()
        assert cluster.wait(timeout=WAIT)
        assert node.busy == 0
        assert node.jobs_done == 5


def test_many_tiny_jobs_all_start_and_finish(local) -> None:
    starts: list[int] = []

    def cluster_status(status: int, node: DispyNode | None, job: DispyJob | None):
        if status == DispyJob.Running:
            starts.append(job.id)

    with JobCluster(jobs.square, nodes=local, cluster_status=cluster_status) as cluster:
        submitted = [cluster.submit_job_id(i, i) for i in range(300)]
        assert cluster.wait(timeout=WAIT)
        assert [j.result for j in submitted] == [i * i for i in range(300)]
        assert all(j.start_time <= j.end_time for j in submitted)
        assert cluster.status().nodes[0].busy == 0
    assert sorted(starts) == list(range(300))


def test_a_job_seen_running_is_counted_in_its_nodes_busy(
    local1, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread that sees a job Running (a monitor, the lab panel, a test)
    sees it counted in its node's busy: a start is counted before the job's status
    says so. Looked at on the I/O thread right as each status turns Running (before,
    busy was counted just after: a panel could show 2 running and 1 busy)."""
    busy_then: list[int] = []
    set_running = DispyJob._set_running

    def looking(job: DispyJob, ip_addr: str, start_time: float | None = None) -> bool:
        started = set_running(job, ip_addr, start_time)
        busy_then.append(sum(node.busy for node in cluster.status().nodes))
        return started

    monkeypatch.setattr(DispyJob, "_set_running", looking)
    with JobCluster(jobs.square, nodes=local1) as cluster:
        assert [job() for job in [cluster.submit(i) for i in range(3)]] == [0, 1, 4]
    assert len(busy_then) == 3 and all(busy >= 1 for busy in busy_then), busy_then
