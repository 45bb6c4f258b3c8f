"""Liveness across the scheduler (issue 16): who declares whom dead, and when.

Real processes on loopback: node servers started from the command line (some reached
through the toxic proxy of tests/toxic.py), a ``dispynb-scheduler`` process and a
`SharedJobCluster`. A node or scheduler that is alive and sending is never declared
dead; a stopped (SIGSTOP) or cut-off node is, within three of its pulses, and its
reentrant jobs finish elsewhere.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import DispyJob, DispyNode, LocalCluster, SharedJobCluster
from tests.jobs import wait_until
from tests.nodeproc import CliNode, running_node
from tests.sharedsched.harness import SchedulerProcess
from tests.toxic import ToxicProxy, Toxics

pytestmark = pytest.mark.slow

#: The scheduler's pulse in these tests (s): a node silent for 3 of them is dead
#: (not shorter: a loaded CI machine can hold a live process up for a second).
PULSE = 0.5

#: Size of the results that take several pulses to cross a throttled link.
BIG = 96 * 1024


def work(n: int, seconds: float = 0.0, size: int = 0) -> tuple[int, bytes]:
    """n squared after ``seconds``, with ``size`` bytes that differ per job."""
    import hashlib
    import time

    if seconds:
        time.sleep(seconds)
    seed = hashlib.sha256(str(n).encode()).digest()
    return n * n, (seed * (size // len(seed) + 1))[:size]


def expected(n: int, size: int) -> tuple[int, bytes]:
    seed = hashlib.sha256(str(n).encode()).digest()
    return n * n, (seed * (size // len(seed) + 1))[:size]


class Lost:
    """The nodes a cluster reports closed (lost), per name."""

    def __init__(self) -> None:
        self.closed: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def cluster_status(self, status: int, node: DispyNode | None, job: object) -> None:
        if status == DispyNode.Closed and node is not None:
            with self.lock:
                self.closed[node.name] += 1


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[CliNode, CliNode]]:
    with (
        running_node(tmp_path / "a", name="a", cpus=2) as a,
        running_node(tmp_path / "b", name="b", cpus=2, secret=a.secret) as b,
    ):
        yield a, b


def start_scheduler(
    tmp_path: Path, nodes: list[str], secret: str, pulse: float = PULSE
) -> SchedulerProcess:
    # The harness passes --pulse_interval 0.5 first: the last one given counts.
    return SchedulerProcess(
        tmp_path, nodes, secret, args=("--pulse_interval", str(pulse))
    ).start()


@pytest.mark.timeout(90)
def test_a_stopped_node_is_declared_dead_by_the_scheduler_and_its_jobs_run_elsewhere(
    tmp_path: Path, users: dict[str, Path], two_nodes: tuple[CliNode, CliNode]
) -> None:
    a, b = two_nodes
    sched = start_scheduler(tmp_path, [a.spec, b.spec], a.secret)
    try:
        with SharedJobCluster(
            work,
            scheduler_host=sched.address,
            secret_file=str(users["alice"]),
            reentrant=True,
        ) as cluster:
            jobs = [cluster.submit(n, 0.3) for n in range(12)]
            wait_until(lambda: len(cluster.status().nodes) == 2)  # both set up
            a.proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
            try:
                sched.wait_for_log("declared dead", timeout=30)
                assert cluster.wait(timeout=30), [job.status for job in jobs]
            finally:
                a.proc.send_signal(signal.SIGCONT)
            assert [job.status for job in jobs] == [DispyJob.Finished] * 12
            assert [job.result for job in jobs] == [expected(n, 0) for n in range(12)]
    finally:
        sched.stop()
    log = sched.log_text()
    assert f"node {a.spec} sent nothing for" in log
    assert f"node {b.spec} sent nothing" not in log


@pytest.mark.timeout(90)
def test_a_node_whose_pulses_queue_behind_results_on_a_slow_link_stays_alive(
    tmp_path: Path, users: dict[str, Path], two_nodes: tuple[CliNode, CliNode]
) -> None:
    """Each result takes about 3 s to cross a 32 KB/s link, 6 of the scheduler's
    pulses: the node's reports wait behind it, but its bytes keep arriving."""
    a, _ = two_nodes
    slow = Toxics(rate=32 * 1024)
    with ToxicProxy(a.port, upstream=Toxics(), downstream=slow) as proxy:
        sched = start_scheduler(tmp_path, [proxy.spec], a.secret)
        lost = Lost()
        try:
            with SharedJobCluster(
                work,
                scheduler_host=sched.address,
                secret_file=str(users["alice"]),
                cluster_status=lost.cluster_status,
            ) as cluster:
                jobs = [cluster.submit(n, 0.0, BIG) for n in range(3)]
                assert cluster.wait(timeout=60), [job.status for job in jobs]
                assert [job.status for job in jobs] == [DispyJob.Finished] * 3
                assert [job.result for job in jobs] == [
                    expected(n, BIG) for n in range(3)
                ]
                gone = dict(lost.closed)
        finally:
            sched.stop()
    assert "sent nothing" not in sched.log_text()
    assert not gone, gone
    assert proxy.stats["down"].bytes > 3 * BIG


@pytest.mark.timeout(90)
def test_a_node_cut_off_by_a_blackhole_is_declared_dead_by_the_scheduler(
    tmp_path: Path, users: dict[str, Path], two_nodes: tuple[CliNode, CliNode]
) -> None:
    a, b = two_nodes
    with ToxicProxy(a.port) as proxy:
        sched = start_scheduler(tmp_path, [proxy.spec, b.spec], a.secret)
        try:
            with SharedJobCluster(
                work,
                scheduler_host=sched.address,
                secret_file=str(users["alice"]),
                reentrant=True,
            ) as cluster:
                jobs = [cluster.submit(n, 0.3) for n in range(8)]
                wait_until(lambda: len(cluster.status().nodes) == 2)  # both set up
                proxy.blackhole()  # the host vanished: bytes held, nothing closed
                sched.wait_for_log(f"node {proxy.spec} sent nothing for", timeout=30)
                assert cluster.wait(timeout=30), [job.status for job in jobs]
                assert [job.result for job in jobs] == [
                    expected(n, 0) for n in range(8)
                ]
        finally:
            sched.stop()


@pytest.mark.timeout(90)
def test_a_client_pulsing_faster_than_the_scheduler_keeps_hearing_it(
    tmp_path: Path,
    users: dict[str, Path],
    nodes: LocalCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client declares the scheduler dead after 3 of its own pulses (0.9 s);
    the scheduler pulses every 3 s by its --pulse_interval. While a 4 s job runs
    nothing else crosses the link: the scheduler must report at the client's pace
    (before, the client lost the scheduler about a second into the job)."""
    sched = start_scheduler(tmp_path, nodes.node_specs(), nodes.secret, pulse=3.0)
    lost = Lost()
    try:
        with (
            caplog.at_level(logging.WARNING, logger="dispynb"),
            SharedJobCluster(
                work,
                scheduler_host=sched.address,
                secret_file=str(users["alice"]),
                pulse_interval=0.3,
                cluster_status=lost.cluster_status,
            ) as cluster,
        ):
            job = cluster.submit(7, 4.0)
            assert job() == expected(7, 0)
            gone = dict(lost.closed)
    finally:
        sched.stop()
    assert not gone, gone
    assert not [r.message for r in caplog.records if "declared dead" in r.message]


@pytest.mark.timeout(90)
def test_a_stopped_scheduler_is_declared_dead_by_its_client(
    tmp_path: Path, users: dict[str, Path], nodes: LocalCluster
) -> None:
    """The other way: the client judges the scheduler by its own pulse."""
    sched = start_scheduler(tmp_path, nodes.node_specs(), nodes.secret)
    assert sched.proc is not None
    lost = Lost()
    try:
        with SharedJobCluster(
            work,
            scheduler_host=sched.address,
            secret_file=str(users["alice"]),
            pulse_interval=0.2,
            cluster_status=lost.cluster_status,
        ) as cluster:
            job = cluster.submit(3, 30.0)
            wait_until(lambda: job.status == DispyJob.Running)
            sched.proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
            try:
                assert cluster.wait(timeout=30)
            finally:
                sched.proc.send_signal(signal.SIGCONT)
            assert job.status == DispyJob.Abandoned
            assert "no pulse for" in str(job.exception)
            wait_until(lambda: sum(lost.closed.values()) >= 1)  # (its own thread)
    finally:
        sched.stop()
