"""Adaptive scaling (`NodeLauncher.adapt`, `scale`): the decisions (`plan`), then
real node processes on this machine grown by a burst, shrunk when idle, and a node
drained while its long job runs."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import pytest

from dispynb import JobCluster
from dispynb.deploy.adaptive import AdaptOptions, NodeView, plan, target_nodes
from dispynb.errors import ConfigurationError
from dispynb.job import JobStatus
from tests.deploy.test_launcher import LocalProcesses

OPTIONS = AdaptOptions(minimum=1, maximum=4, idle_timeout=30, cooldown=10)


def idle(name: str, seconds: float | None, jobs: int = 0) -> NodeView:
    return NodeView(name, True, jobs, seconds)


def test_target_follows_jobs_and_cpus_within_bounds() -> None:
    assert target_nodes(OPTIONS, 0, 4, 3) == 1  # minimum
    assert target_nodes(OPTIONS, 9, 4, 1) == 3  # ceil(9 / 4)
    assert target_nodes(OPTIONS, 100, 4, 1) == 4  # maximum
    # CPUs unknown (nothing registered yet): one node to learn them, no more.
    assert target_nodes(AdaptOptions(maximum=4), 100, None, 0) == 1
    assert target_nodes(AdaptOptions(maximum=4), 100, None, 2) == 2


def test_plan_launches_for_waiting_jobs_counting_nodes_still_starting() -> None:
    starting = NodeView("b", False, 0, None)
    assert plan(OPTIONS, 8, 2, [idle("a", None, 2)], 0.0) == (3, [])
    # The same burst a look later: the launched nodes count, nothing more.
    assert plan(OPTIONS, 8, 2, [idle("a", None, 2), starting, starting], 0.0) == (
        1,
        [],
    )


def test_plan_drains_only_nodes_idle_long_enough_and_after_the_cooldown() -> None:
    nodes = [idle("a", 31.0), idle("b", 5.0), idle("c", 40.0)]
    # Idle for idle_timeout, above what the jobs need, out of the cooldown:
    assert plan(OPTIONS, 0, 2, nodes, 60.0) == (0, ["c", "a"])
    # Never below minimum, and the jobs still running keep their nodes:
    assert plan(OPTIONS, 4, 2, nodes, 60.0) == (0, ["c"])
    # Within the cooldown of the last change: nothing.
    assert plan(OPTIONS, 0, 2, nodes, 5.0) == (0, [])
    # Idle, but not for idle_timeout: nothing.
    assert plan(OPTIONS, 0, 2, [idle("a", 29.0), idle("b", 1.0)], 60.0) == (0, [])


def test_plan_over_the_maximum_drains_at_once_least_busy_first() -> None:
    options = AdaptOptions(minimum=0, maximum=1)
    nodes = [
        idle("busy", None, 3),
        idle("less", None, 1),
        NodeView("new", False, 0, None),
    ]
    assert plan(options, 10, 4, nodes, 0.0) == (0, ["new", "less"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"minimum": 3, "maximum": 2},
        {"minimum": -1},
        {"maximum": 0},
        {"idle_timeout": -1},
        {"interval": 0},
        {"cpus_per_node": 0},
    ],
)
def test_bad_bounds_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError, match="adapt"):
        AdaptOptions(**kwargs)  # type: ignore[arg-type]


def hold(release: str, x: int) -> int:
    """A job that runs until the file ``release`` exists."""
    while not os.path.exists(release):
        time.sleep(0.02)
    return x * 10


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def actions(nodes: LocalProcesses, action: str) -> list[str]:
    return [e.node for e in nodes.events if e.action == action]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_burst_grows_to_maximum_idle_shrinks_to_minimum(tmp_path: Path) -> None:
    release = str(tmp_path / "release")
    with LocalProcesses() as nodes:  # 1 CPU per node
        nodes.adapt(minimum=1, maximum=3, idle_timeout=1.0, interval=0.1, cooldown=0)
        with JobCluster(hold, nodes=nodes) as cluster:
            assert len(cluster.status().nodes) == 1
            jobs = [cluster.submit(release, i) for i in range(5)]
            wait_until(lambda: len(cluster.status().nodes) == 3, 60, "grown to 3")
            assert len(actions(nodes, "launch")) == 3  # never over the maximum
            Path(release).touch()
            assert [job() for job in jobs] == [i * 10 for i in range(5)]
            wait_until(lambda: len(actions(nodes, "stopped")) == 2, 60, "shrunk")
            assert len(cluster.status().nodes) == 1
            assert len(nodes.nodes) == 1
            assert nodes.exited() == []  # stopped on purpose: no failure
            # Jobs after the shrink still run (on the node left, and new ones).
            assert cluster.submit(release, 7)() == 70


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_drained_node_finishes_its_running_job_first(tmp_path: Path) -> None:
    release = str(tmp_path / "release")
    with LocalProcesses() as nodes:
        nodes.start(2)
        nodes.wait_for(2, timeout=30)
        with JobCluster(hold, nodes=nodes) as cluster:
            wait_until(lambda: len(cluster.status().nodes) == 2, 30, "2 nodes")
            jobs = [cluster.submit(release, i) for i in range(2)]
            wait_until(
                lambda: all(j.status == JobStatus.Running for j in jobs), 30, "running"
            )
            nodes.scale(1)  # both busy: one is drained while its job runs
            wait_until(lambda: actions(nodes, "drain"), 10, "a drain")
            drained = actions(nodes, "drain")[0]
            assert actions(nodes, "stopped") == []  # its job still runs
            Path(release).touch()
            assert [job() for job in jobs] == [0, 10]
            assert all(job.status == JobStatus.Finished for job in jobs)
            wait_until(lambda: actions(nodes, "stopped") == [drained], 30, "stopped")
            assert [n.name for n in nodes.nodes] != [drained]
            assert len(nodes.nodes) == 1


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_from_zero_nodes_and_back_to_zero(tmp_path: Path) -> None:
    """``minimum=0``: the cluster gets a first node, idleness takes every node away,
    and a job submitted to a cluster without nodes makes one start again."""
    release = str(tmp_path / "release")
    Path(release).touch()
    with LocalProcesses() as nodes:
        nodes.adapt(minimum=0, maximum=2, idle_timeout=0.5, interval=0.1, cooldown=0)
        with JobCluster(hold, nodes=nodes) as cluster:
            assert cluster.submit(release, 1)() == 10
            wait_until(lambda: len(actions(nodes, "stopped")) == 1, 60, "none left")
            assert cluster.status().nodes == [] and nodes.nodes == []
            assert cluster.submit(release, 2)() == 20  # a node starts for it
            assert len(actions(nodes, "launch")) == 2
        nodes.scale(2)  # ends adapt; launches the one missing at once
        nodes.wait_for(2, timeout=30)
        assert len(actions(nodes, "launch")) == 3
        nodes.scale(0)  # no cluster: nothing to drain, they stop
        wait_until(lambda: len(actions(nodes, "stopped")) == 3, 30, "stopped")
        assert nodes.nodes == [] and nodes.exited() == []


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_failing_launches_back_off() -> None:
    """Nodes that cannot start are reported and relaunched less and less often,
    not in a loop."""
    with LocalProcesses(extra=("--no-such-option",)) as nodes:
        nodes.adapt(minimum=1, maximum=2, interval=0.05)
        wait_until(lambda: len(actions(nodes, "failed")) >= 4, 30, "4 failures")
        launches = [e.time for e in nodes.events if e.action == "launch"]
        gaps = [b - a for a, b in itertools.pairwise(launches)]
        # After the n-th failure in a row: at least interval * 2**n before the next.
        for n, gap in enumerate(gaps[:3], start=1):
            assert gap >= 0.05 * 2**n, gaps
        assert all("exited with status 2" in why for why in nodes.exited())


def test_a_launcher_that_cannot_launch_backs_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``ssh`` missing: `start` raises `LaunchError`; adapt warns and backs off."""
    from dispynb.deploy import LaunchError, SSHNodes

    with pytest.raises(LaunchError, match="cannot run '/nonexistent/ssh'"):
        SSHNodes(["h1"], ssh="/nonexistent/ssh", register_host="127.0.0.1")
    nodes = SSHNodes(
        ["h1"], ssh="/nonexistent/ssh", register_host="127.0.0.1", start=False
    )
    with nodes:
        nodes.adapt(minimum=1, interval=0.05)

        def warned() -> int:
            return sum("adapt: launching failed" in r.message for r in caplog.records)

        wait_until(lambda: warned() >= 3, 30, "3 failed launches")
        messages = [
            r.message for r in caplog.records if "launching failed" in r.message
        ]
        assert "next launch in 0.1 s" in messages[0]
        assert "next launch in 0.4 s" in messages[2]  # twice as long each time
