"""Nodes that die, hang or come back; clients that go silent (real processes, loopback).

Multi-host versions of these (namespaces, cut links) are in tests/multihost.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from dispynb import DispyJob, DispyNode, JobCluster
from tests.jobs import wait_until
from tests.nodeproc import running_node, start_node

pytestmark = pytest.mark.slow

PULSE = 0.2


def slow_square(n: int) -> tuple[int, str]:
    import time

    time.sleep(0.3)
    return n * n, dispy_node_name  # type: ignore[name-defined]  # noqa: F821


class Events:
    """Records job_status calls per job id and when each node was closed."""

    def __init__(self) -> None:
        self.finals: collections.Counter[object] = collections.Counter()
        self.closed: dict[str, float] = {}
        self.lock = threading.Lock()

    def job_status(self, job: DispyJob) -> None:
        with self.lock:
            self.finals[job.id] += 1

    def cluster_status(self, status: int, node: DispyNode | None, job: object) -> None:
        if status == DispyNode.Closed and node is not None:
            self.closed.setdefault(node.name, time.monotonic())


def test_stopped_node_declared_dead_and_reentrant_jobs_complete_once(tmp_path):
    events = Events()
    with (
        running_node(tmp_path / "a", name="a") as a,
        running_node(tmp_path / "b", name="b", secret=a.secret) as b,
    ):
        cluster = JobCluster(
            slow_square,
            nodes=[a.spec, b.spec],
            secret=a.secret,
            reentrant=True,
            pulse_interval=PULSE,
            job_status=events.job_status,
            cluster_status=events.cluster_status,
        )
        try:
            wait_until(lambda: len(cluster.status().nodes) == 2)
            jobs = [cluster.submit(n) for n in range(12)]
            wait_until(lambda: any(job.status == DispyJob.Running for job in jobs))
            stopped_at = time.monotonic()
            a.proc.send_signal(signal.SIGSTOP)
            try:
                wait_until(lambda: "a" in events.closed)
                detection = events.closed["a"] - stopped_at
                assert cluster.wait(timeout=30)
            finally:
                a.proc.send_signal(signal.SIGCONT)
            assert all(job.status == DispyJob.Finished for job in jobs)
            assert sorted(job.result[0] for job in jobs) == [n * n for n in range(12)]
            # Jobs a had when it stopped ran again on b; each has one final result.
            cluster.wait()
            assert all(count == 1 for count in events.finals.values())
            assert len(events.finals) == 12
        finally:
            cluster.close()
    # dead after 3 pulses without a word; checked every half pulse
    assert detection < 4 * PULSE + 1.0, f"detected after {detection:.2f} s"
    print(f"dead-node detection: {detection:.2f} s with pulse {PULSE} s")


def test_killed_node_jobs_not_reentrant_are_abandoned_with_reason(tmp_path):
    with (
        running_node(tmp_path / "a", name="a") as a,
        running_node(tmp_path / "b", name="b", secret=a.secret) as b,
        JobCluster(
            slow_square, nodes=[a.spec, b.spec], secret=a.secret, pulse_interval=PULSE
        ) as cluster,
    ):
        wait_until(lambda: len(cluster.status().nodes) == 2)
        jobs = [cluster.submit(n) for n in range(8)]
        wait_until(lambda: any(job.status == DispyJob.Running for job in jobs))
        a.proc.kill()
        assert cluster.wait(timeout=30)
    abandoned = [job for job in jobs if job.status == DispyJob.Abandoned]
    finished = [job for job in jobs if job.status == DispyJob.Finished]
    assert abandoned and finished
    assert len(abandoned) + len(finished) == 8
    assert all(a.spec in job.exception for job in abandoned)
    assert all(job.result[1] == "b" for job in finished)


def test_node_restarted_on_same_port_is_used_again(tmp_path):
    first = start_node(tmp_path / "n", name="n")
    try:
        with JobCluster(
            slow_square, nodes=[first.spec], secret=first.secret, pulse_interval=PULSE
        ) as cluster:
            assert cluster.submit(2)()[0] == 4
            first.proc.kill()
            first.proc.wait()
            wait_until(lambda: not cluster.status().nodes)  # seen as lost
            waiting = cluster.submit(3)  # no node now: it waits for the node to return
            again = start_node(
                tmp_path / "n2",
                "--port",
                str(first.port),
                name="n",
                secret=first.secret,
            )
            try:
                assert waiting.wait(timeout=30)
                assert waiting.status == DispyJob.Finished, waiting.exception
                assert waiting.result == (9, "n")
            finally:
                cluster.close()
                again.stop()
    finally:
        if first.proc.poll() is None:
            first.proc.kill()


CLIENT = """
import sys, time
import dispynb as dispy
def sleeper(_):
    import time
    time.sleep(120)
cluster = dispy.JobCluster(sleeper, nodes=[sys.argv[1]], secret=sys.argv[2])
cluster.submit(0)
print("submitted", flush=True)
time.sleep(120)
"""


def test_silent_client_computation_is_freed_by_node(tmp_path):
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    with running_node(tmp_path / "n", "--orphan-timeout", "1") as node:
        client = subprocess.Popen(
            [sys.executable, str(script), node.spec, node.secret],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "submitted"
            node_proc = psutil.Process(node.proc.pid)
            wait_until(lambda: len(node_proc.children(recursive=True)) >= 2)
            os.kill(client.pid, signal.SIGSTOP)  # alive, connected, silent
            wait_until(lambda: not node_proc.children(recursive=True), timeout=20)
            assert "silent" in node.log_text()
        finally:
            client.kill()
            client.wait()
            client.stdout.close()


def test_node_shutting_down_hands_back_jobs_that_did_not_start(tmp_path):
    """SIGTERM to one of two nodes: at most its running job is lost; every job it
    had queued runs on the other node (not reentrant: they never started)."""
    with (
        running_node(tmp_path / "a", name="a") as a,
        running_node(tmp_path / "b", name="b", secret=a.secret) as b,
        JobCluster(
            slow_square, nodes=[a.spec, b.spec], secret=a.secret, pulse_interval=PULSE
        ) as cluster,
    ):
        wait_until(lambda: len(cluster.status().nodes) == 2)
        jobs = [cluster.submit(n) for n in range(16)]
        node_a = next(n for n in cluster.status().nodes if n.name == "a")
        wait_until(lambda: len(cluster.node_jobs(node_a)) >= 2)  # some queued
        assert a.stop() == 0  # SIGTERM: a graceful shutdown
        assert cluster.wait(timeout=30)
    abandoned = [job for job in jobs if job.status == DispyJob.Abandoned]
    finished = [job for job in jobs if job.status == DispyJob.Finished]
    assert len(abandoned) <= 1  # the job running on a when it stopped
    assert len(finished) + len(abandoned) == 16
    assert sorted(job.result[0] for job in finished) == sorted(
        job._args[0] ** 2 for job in finished
    )
    assert any(job.result[1] == "b" for job in finished)
