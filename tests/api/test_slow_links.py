"""Jobs over slow, sliced, throttled and blackholed links (reliability goal row 10).

A real node process is reached only through the toxic proxy of tests/toxic.py (the
kernel here has no netem). Under each toxic ~100 small jobs and a few with 100 KB
arguments and results must all finish, correctly and exactly once, and the node must
not be declared dead while its pulses arrive late but within the bound (3 pulses).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import DispyJob, DispyNode, JobCluster
from tests.jobs import jobs_held, wait_until
from tests.nodeproc import CliNode, node_env, running_node
from tests.toxic import ToxicProxy, Toxics

pytestmark = pytest.mark.slow

#: Pulse interval (s); a node silent for 3 pulses is declared dead.
PULSE = 1.0

#: Size of the big arguments and results.
BIG = 100 * 1024


def work(n: int, blob: bytes = b"", seconds: float = 0.0) -> tuple[int, bytes, str]:
    """n squared, ``blob`` reversed (a result as big as the argument), node name."""
    import time

    if seconds:
        time.sleep(seconds)
    return n * n, blob[::-1], dispy_node_name  # type: ignore[name-defined]  # noqa: F821


def blob(n: int) -> bytes:
    """BIG bytes that differ per job (so a mixed-up result is caught)."""
    seed = hashlib.sha256(str(n).encode()).digest()
    return (seed * (BIG // len(seed) + 1))[:BIG]


class Events:
    """Counts final job_status calls per job and node closings per node."""

    def __init__(self) -> None:
        self.finals: collections.Counter[object] = collections.Counter()
        self.closed: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def job_status(self, job: DispyJob) -> None:
        if job.status in (DispyJob.Finished, DispyJob.Terminated, DispyJob.Abandoned):
            with self.lock:
                self.finals[job.id] += 1

    def cluster_status(self, status: int, node: DispyNode | None, job: object) -> None:
        if status == DispyNode.Closed and node is not None:
            with self.lock:
                self.closed[node.name] += 1


@pytest.fixture
def node(tmp_path: Path) -> Iterator[CliNode]:
    with running_node(tmp_path / "a", name="a", cpus=2) as started:
        yield started


def cluster_via(nodes: list[str], secret: str, events: Events) -> JobCluster:
    return JobCluster(
        work,
        nodes=nodes,
        secret=secret,
        reentrant=True,
        pulse_interval=PULSE,
        job_status=events.job_status,
        cluster_status=events.cluster_status,
    )


def run_jobs(cluster: JobCluster, small: int, big: int) -> list[DispyJob]:
    """Submit ``small`` tiny jobs and ``big`` 100 KB ones; wait; check every result."""
    jobs = [cluster.submit(n) for n in range(small)]
    jobs += [cluster.submit(n, blob(n)) for n in range(small, small + big)]
    assert cluster.wait(timeout=40), "jobs did not finish"
    for n, job in enumerate(jobs):
        assert job.status == DispyJob.Finished, (n, job.status, job.exception)
        square, reversed_blob, _ = job.result
        assert square == n * n
        assert reversed_blob == (blob(n)[::-1] if n >= small else b"")
    return jobs


def check_once(events: Events, jobs: list[DispyJob]) -> None:
    """Every job reached exactly one final state (job_status runs on its own thread)."""
    wait_until(lambda: len(events.finals) == len(jobs))
    assert all(count == 1 for count in events.finals.values()), events.finals


TOXICS = {
    # one way 300-700 ms: a pulse arrives at most 1.4 s after the one before
    "latency": (Toxics(latency=0.5, jitter=0.2), Toxics(latency=0.5, jitter=0.2)),
    "slicer": (Toxics(slice_size=1), Toxics(slice_size=1)),
    "256kbit": (Toxics(rate=32 * 1024), Toxics(rate=32 * 1024)),
}


@pytest.mark.parametrize("name", list(TOXICS))
@pytest.mark.timeout(60)
def test_jobs_complete_once_without_false_death(node, name):
    upstream, downstream = TOXICS[name]
    events = Events()
    started = time.monotonic()
    with ToxicProxy(node.port, upstream=upstream, downstream=downstream) as proxy:
        cluster = cluster_via([proxy.spec], node.secret, events)
        try:
            jobs = run_jobs(cluster, small=100, big=3)
            check_once(events, jobs)
            lost = dict(events.closed)  # closing the cluster closes the node too
        finally:
            cluster.close()
    assert not lost, f"node declared lost: {lost}"
    assert proxy.connections == 1  # never reconnected: no death, no link loss
    for way, toxics in (("up", upstream), ("down", downstream)):
        assert proxy.stats[way].bytes > 3 * BIG
        if toxics.slice_size:
            assert proxy.stats[way].max_write == toxics.slice_size
    print(f"{name}: {len(jobs)} jobs in {time.monotonic() - started:.1f} s")


def test_short_blackhole_is_no_death(node):
    """Forwarding stops for 1.2 s (well under 3 pulses): jobs wait, nobody dies."""
    events = Events()
    with ToxicProxy(node.port) as proxy:
        cluster = cluster_via([proxy.spec], node.secret, events)
        try:
            jobs = [cluster.submit(n, b"", 0.05) for n in range(40)]
            wait_until(lambda: any(job.status == DispyJob.Running for job in jobs))
            proxy.blackhole(1.2)
            assert cluster.wait(timeout=30)
            check_once(events, jobs)
            assert [job.result[0] for job in jobs] == [n * n for n in range(40)]
            lost = dict(events.closed)  # closing the cluster closes the node too
        finally:
            cluster.close()
    assert not lost, f"node declared lost: {lost}"
    assert proxy.connections == 1


def test_long_blackhole_declares_death_and_jobs_finish_elsewhere_once(node, tmp_path):
    """Forwarding stops for 6 s (over 3 pulses): the node is declared dead once, its
    reentrant jobs run on a second node reached directly, each result counts once."""
    events = Events()
    with (
        running_node(tmp_path / "b", name="b", secret=node.secret) as direct,
        ToxicProxy(node.port) as proxy,
    ):
        cluster = cluster_via([proxy.spec, direct.spec], node.secret, events)
        try:
            wait_until(lambda: len(cluster.status().nodes) == 2)
            jobs = [cluster.submit(n, b"", 0.3) for n in range(24)]
            via_proxy = next(n for n in cluster.status().nodes if n.name == "a")
            wait_until(lambda: jobs_held(cluster, via_proxy) >= 2)
            blackholed_at = time.monotonic()
            proxy.blackhole(6.0)
            wait_until(lambda: events.closed["a"] >= 1, timeout=15)
            detection = time.monotonic() - blackholed_at
            assert cluster.wait(timeout=30)
            check_once(events, jobs)
            assert [job.result[0] for job in jobs] == [n * n for n in range(24)]
            # After the heal the node is admitted again on a new connection (the
            # old one, with its late results, was closed when it was declared dead).
            wait_until(
                lambda: any(n.name == "a" for n in cluster.status().nodes), timeout=20
            )
            assert proxy.connections >= 2
            lost = dict(events.closed)  # closing the cluster closes the nodes too
        finally:
            cluster.close()
    assert lost == {"a": 1}, lost
    assert all(count == 1 for count in events.finals.values()), events.finals
    assert detection < 3 * PULSE + PULSE / 2 + 1.5, f"detected after {detection:.1f} s"


# The same checks with the kernel's tbf qdisc doing the throttling: this script runs
# in a private network namespace (only lo, MTU 1500 so packets fit the tbf burst).
TBF_CLIENT = """
import json, sys
from pathlib import Path
from tests.api.test_slow_links import Events, cluster_via, run_jobs, check_once
from tests.nodeproc import running_node

events = Events()
with running_node(Path(sys.argv[1]), name="a", cpus=2) as node:
    cluster = cluster_via([node.spec], node.secret, events)
    try:
        jobs = run_jobs(cluster, small=int(sys.argv[2]), big=int(sys.argv[3]))
        check_once(events, jobs)
        lost = dict(events.closed)
    finally:
        cluster.close()
print(json.dumps({"jobs": len(jobs), "lost": lost}))
"""

TBF = "tc qdisc add dev lo root tbf rate 256kbit burst 16kbit latency 200ms"


@pytest.mark.timeout(60)
def test_jobs_complete_once_over_kernel_tbf_256kbit(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private network namespace")
    script = tmp_path / "client.py"
    script.write_text(TBF_CLIENT)
    command = [
        "unshare", "-n", "sh", "-c",
        f'ip link set lo up && ip link set lo mtu 1500 && {TBF} && exec "$@"', "sh",
        sys.executable, str(script), str(tmp_path / "node"), "100", "2",
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=tmp_path,  # not the checkout: a failed run may leave a recovery file
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary == {"jobs": 102, "lost": {}}, summary
