"""dispynb on a real Ray cluster: Ray nodes that join and leave while a
`JobCluster` is open. Runs as test_ray.py does (see its docstring); these tests add
nodes to the shared Ray cluster, so they run last."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

import dispynb
from dispynb import JobCluster
from dispynb.backends.ray import RayEngine
from dispynb.job import JobStatus
from tests.backends.rayhead import RayHead
from tests.backends.raywork import WAIT, record_setup, wait_for

#: Ray's driver keeps its connections to the actors' workers (its cache).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.usefixtures("allow_engine_sockets"),
]


# -- computations (by value, as from a notebook) ------------------------------------


def node_of(n: int) -> tuple[int, str]:
    import ray

    return n, str(ray.get_runtime_context().get_node_id())


def waits_for(folder: str, name: str) -> str:
    import ray

    Path(folder, f"running-{os.getpid()}").touch()
    while not Path(folder, name).exists():
        time.sleep(0.05)
    return str(ray.get_runtime_context().get_node_id())


def start_node(head: RayHead, alive: int) -> Any:
    """Add a one-CPU Ray node; wait until ``alive`` nodes are up."""
    import ray

    def up() -> int:
        return sum(1 for n in ray.nodes() if n["Alive"])

    for _ in range(3):  # its raylet may abort on a loaded machine: start it again
        node = head.add_node(cpus=1)
        deadline = time.monotonic() + WAIT
        while up() < alive and node.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if up() == alive:
            return node
        head.kill_node(node)
    raise AssertionError(f"the second Ray node did not start:\n{head.raylet_logs()}")


def stop_node(head: RayHead, node: Any, alive: int) -> None:
    """Kill a node of `start_node`; wait until Ray counts ``alive`` nodes."""
    import ray

    head.kill_node(node)
    wait_for(
        lambda: sum(1 for n in ray.nodes() if n["Alive"]) == alive,
        "Ray to see the node gone",
    )


# -- tests ----------------------------------------------------------------------------


def test_node_that_joins_later_is_set_up_and_takes_submit_node_jobs(
    head: RayHead, tmp_path: Path
) -> None:
    """A Ray node started after the JobCluster opened gets the computation's setup
    (DispyNode.Initialized) and jobs; ``submit_node`` runs jobs only on the node
    chosen (the new one, then the head)."""
    import ray

    ready: list[Any] = []

    def cluster_status(status: int, node: Any, job: Any) -> None:
        if status == dispynb.DispyNode.Initialized:
            ready.append(node)

    folder = str(tmp_path)
    head_id = ray.get_runtime_context().get_node_id()
    cluster = JobCluster(
        node_of,
        setup=lambda: record_setup(folder),
        cluster_status=cluster_status,
        engine=RayEngine(head.address),
    )
    node = None
    try:
        wait_for(lambda: len(ready) == 1, "the head set up")
        node = start_node(head, alive=2)
        wait_for(lambda: len(ready) == 2, "the joined node set up")

        # A node is ready once its first actor is set up: the head's second one
        # may still be setting up on a loaded machine.
        def setups() -> int:
            return len(list(tmp_path.glob("setup-*")))

        wait_for(lambda: setups() >= 3, "the setups of the head's 2 actors and 1 new")
        assert setups() == 3
        joined = ready[1]
        pinned = [cluster.submit_node(joined, n) for n in range(6)]
        results = [job() for job in pinned]
        assert [n for n, _ in results] == list(range(6))
        joined_ids = {where for _, where in results}
        assert len(joined_ids) == 1 and joined_ids != {head_id}
        on_head = [cluster.submit_node(ready[0], n) for n in range(6)]
        assert {job()[1] for job in on_head} == {head_id}
        anywhere = [cluster.submit(n) for n in range(30)]
        assert [job()[0] for job in anywhere] == list(range(30))
    finally:
        cluster.close()
        if node is not None:
            stop_node(head, node, alive=1)


def test_lost_node_closes_and_its_jobs_run_elsewhere(
    head: RayHead, tmp_path: Path
) -> None:
    """A Ray node dies (SIGKILL to its raylet and workers): it leaves the cluster
    (DispyNode.Closed), its running job is run again on the other node (reentrant).
    Last in the module: it adds a node to the shared Ray cluster."""
    node = start_node(head, alive=2)
    closed: list[Any] = []

    def cluster_status(status: int, node: Any, job: Any) -> None:
        if status == dispynb.DispyNode.Closed:
            closed.append(node)

    folder = str(tmp_path)
    cluster = JobCluster(
        waits_for,
        reentrant=True,
        cluster_status=cluster_status,
        engine=RayEngine(head.address),
    )
    try:
        jobs = [cluster.submit(folder, "release") for _ in range(3)]
        wait_for(lambda: len(list(tmp_path.glob("running-*"))) == 3, "3 running jobs")
        head.kill_node(node)
        wait_for(lambda: len(closed) == 1, "the lost node's Closed event")
        Path(folder, "release").touch()
        node_ids = [job() for job in jobs]
        assert [job.status for job in jobs] == [JobStatus.Finished] * 3
        assert len(set(node_ids)) == 1  # all on the head now
    finally:
        cluster.close()
