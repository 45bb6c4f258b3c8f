"""``NodeAllocate`` (subclasses too) given to a SharedJobCluster: asked about each
node behind the scheduler, as dispy asks it about each node it finds; a node it
declines runs none of the cluster's jobs, one it gives fewer CPUs runs that many
at once. Real node servers and a real scheduler process."""

from __future__ import annotations

import os
import platform
import signal
from pathlib import Path
from typing import Any

import pytest

from dispynb import LocalCluster, NodeAllocate, SharedJobCluster, recover_jobs
from dispynb.job import JobStatus
from tests.jobs import wait_until
from tests.nodeproc import start_node
from tests.sharedsched.harness import SchedulerProcess, start_client
from tests.sharedsched.nodeuse import by_name, overlapped, where

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: The nodes each `Chooser` was asked about, by name.
ASKED: list[str] = []


class Chooser(NodeAllocate):
    """All of ``local-0``'s CPUs, one of ``local-1``'s, none of any other's."""

    def allocate(
        self, cluster: Any, ip_addr: str, name: str, cpus: int, **kw: Any
    ) -> int:
        ASKED.append(name)
        return {"local-0": cpus, "local-1": 1}.get(name, 0)


class OnlyFirst(NodeAllocate):
    def allocate(
        self, cluster: Any, ip_addr: str, name: str, cpus: int, **kw: Any
    ) -> int:
        ASKED.append(name)
        return cpus if name == "local-0" else 0


#: The platform each `SamePlatform` was told, by node name.
PLATFORMS: dict[str, str] = {}


class SamePlatform(NodeAllocate):
    """dispy users' filter: only nodes on this client's platform."""

    def allocate(
        self, cluster: Any, ip_addr: str, name: str, cpus: int, **kw: Any
    ) -> int:
        PLATFORMS[name] = kw["platform"]
        return cpus if kw["platform"] == platform.platform() else 0


def alices(
    allocation: NodeAllocate, scheduler: SchedulerProcess, users: dict[str, Path]
) -> SharedJobCluster:
    """Alice's cluster of `where` jobs through ``scheduler``, given ``allocation``."""
    return SharedJobCluster(
        where,
        nodes=[allocation],
        scheduler_host=scheduler.address,
        secret_file=str(users["alice"]),
    )


def test_a_node_allocate_subclass_is_asked_about_each_node_behind_the_scheduler(
    scheduler: SchedulerProcess, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    ASKED.clear()
    assert nodes.names == ["local-0", "local-1"]
    with alices(Chooser("*"), scheduler, users) as cluster:
        # Submitted at once: none waits for the choice, none goes where it may not.
        jobs = [cluster.submit(0.5) for _ in range(6)]
        wait_until(lambda: sorted(by_name(cluster)) == ["local-0", "local-1"])
        assert {n: node.cpus for n, node in by_name(cluster).items()} == {
            "local-0": 2,
            "local-1": 1,
        }
        assert sorted(ASKED) == ["local-0", "local-1"]  # each node, not the scheduler
        ran = [job() for job in jobs]
        assert set(ran) == {"local-0", "local-1"}
        assert not overlapped(
            [j for j, n in zip(jobs, ran, strict=True) if n == "local-1"]
        )


def test_a_node_the_allocation_declines_runs_none_of_the_jobs(
    scheduler: SchedulerProcess, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    with alices(OnlyFirst("*"), scheduler, users) as cluster:
        jobs = [cluster.submit(0.3) for _ in range(8)]  # 4 CPUs if both ran them
        assert {job() for job in jobs} == {"local-0"}
        assert sorted(by_name(cluster)) == ["local-0"]
    log = scheduler.log_text()
    assert "alice/where: its client closed node" in log


def test_a_node_allocate_is_told_each_nodes_platform(
    scheduler: SchedulerProcess, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    PLATFORMS.clear()
    with alices(SamePlatform("*"), scheduler, users) as cluster:
        wait_until(lambda: len(PLATFORMS) == 2)
        # The nodes run here: the platform each said, as dispy passes it.
        this = platform.platform()
        assert dict(PLATFORMS) == {"local-0": this, "local-1": this}
        assert {cluster.submit(0.0)() for _ in range(4)} <= {"local-0", "local-1"}
        assert {node.platform for node in cluster.status().nodes} == {
            platform.platform()
        }


#: Job 0 runs until ``marks/go`` exists (30 s at most), job 1 at once; both say
#: which node ran them. Says so once job 0 runs (job 1 then waits at the scheduler:
#: the only node up has 1 CPU).
AWAY_CLIENT = """
import sys, time
from dispynb import NodeAllocate, SharedJobCluster
from dispynb.job import JobStatus

class All(NodeAllocate):
    def allocate(self, cluster, ip_addr, name, cpus, **kw):
        return cpus

def step(n, marks):
    import os, time
    deadline = time.monotonic() + 30
    while n == 0 and not os.path.exists(os.path.join(marks, "go")):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return dispy_node_name

address, credential, journal, marks = sys.argv[1:5]
cluster = SharedJobCluster(
    step, nodes=[All("*")], scheduler_host=address, secret_file=credential,
    recover_file=journal,
)
jobs = [cluster.submit(n, marks) for n in range(2)]
while jobs[0].status != JobStatus.Running:
    time.sleep(0.02)
# A round trip to the scheduler after both jobs (in order on its connection).
assert cluster.set_node_cpus("first", 1) == 1
print("submitted", flush=True)
time.sleep(300)
"""


def test_a_node_set_up_again_while_its_client_is_away_runs_the_jobs_waiting(
    tmp_path: Path, users: dict[str, Path]
) -> None:
    """The scheduler holds a node set up for such a computation until its client's
    allocate() answers: with the client away (before ``recover_jobs``), none
    can, and the jobs waiting must not wait for ever."""
    first = start_node(tmp_path / "first", name="first", cpus=1)
    later = start_node(tmp_path / "later", name="later", cpus=1)
    sched = SchedulerProcess(tmp_path, [first.spec, later.spec], first.secret)
    proc = None
    try:
        sched.start()
        later.stop()
        sched.wait_for_log(f"node {later.spec} stopped")
        marks = tmp_path / "marks"
        marks.mkdir()
        journal = tmp_path / "step.journal"
        proc = start_client(
            AWAY_CLIENT, sched.address, str(users["alice"]), str(journal),
            str(marks), cwd=tmp_path, name="step",
        )  # fmt: skip
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "submitted", proc.communicate()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=20)
        sched.wait_for_log("client gone; its jobs go on")
        later = start_node(
            tmp_path / "later", "--port", str(later.port), name="later", cpus=1
        )
        jobs = recover_jobs(str(journal), secret_file=str(users["alice"]), timeout=15)
        # Job 0 still holds the first node: job 1 ran on the one set up again.
        assert jobs[1].status == JobStatus.Finished, (jobs[1].status, sched.log_text())
        assert jobs[1].result == "later"
    finally:
        (tmp_path / "marks" / "go").touch()
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        sched.stop()
        later.stop()
        first.stop()


def test_a_declined_node_that_comes_back_is_asked_again(
    tmp_path: Path, users: dict[str, Path]
) -> None:
    """As dispy asks a node it finds again: the node restarts on its address."""
    first = start_node(tmp_path / "first", name="local-0", cpus=1)
    second = start_node(tmp_path / "second", name="local-1", cpus=1)
    sched = SchedulerProcess(tmp_path, [first.spec, second.spec], first.secret)
    ASKED.clear()
    try:
        sched.start()
        with alices(OnlyFirst("*"), sched, users) as cluster:
            sched.wait_for_log(f"its client closed node {second.spec}")
            assert ASKED.count("local-1") == 1
            second.stop()
            second = start_node(
                tmp_path / "second", "--port", str(second.port), name="local-1"
            )
            wait_until(lambda: ASKED.count("local-1") == 2)
            assert {cluster.submit(0.0)() for _ in range(3)} == {"local-0"}
    finally:
        sched.stop()
        second.stop()
        first.stop()


def test_allocate_node_uses_a_node_the_allocation_declined(
    scheduler: SchedulerProcess, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """As dispy's allocate_node: the node named is used, on all its CPUs."""
    ASKED.clear()
    with alices(OnlyFirst("*"), scheduler, users) as cluster:
        scheduler.wait_for_log("its client closed node")
        assert cluster.allocate_node("local-1") == 0
        wait_until(lambda: sorted(by_name(cluster)) == ["local-0", "local-1"])
        assert by_name(cluster)["local-1"].cpus == 2
        assert cluster.submit_node("local-1", 0.0)() == "local-1"
        assert ASKED.count("local-1") == 1  # named: not asked again
