"""Smaller parts of dispy's API: node resources, setup limit, logger, recover_jobs,
computations dispy could not ship, several client processes at once."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import time

import pytest

import dispynb
from dispynb import DispyJob, DispyNode, DispyNodeAvailInfo, JobCluster, NodeAllocate
from dispynb.errors import SetupError
from tests.jobs import WAIT, wait_until

pytestmark = pytest.mark.slow


def test_node_avail_info_at_start_and_in_pulses(local):
    seen = threading.Event()
    received: list[DispyNode] = []

    def cluster_status(
        status: int, node: DispyNode | None, job: DispyJob | None
    ) -> None:
        if status == DispyNode.AvailInfo and node is not None:
            received.append(node)
            seen.set()

    with JobCluster(
        abs, nodes=local, pulse_interval=0.2, cluster_status=cluster_status
    ) as cluster:
        info = cluster.status().nodes[0].avail_info
        assert isinstance(info, DispyNodeAvailInfo)
        assert 0.0 <= info.cpu <= 100.0
        assert info.memory > 0 and info.disk > 0
        assert seen.wait(WAIT)
    assert isinstance(received[0].avail_info, DispyNodeAvailInfo)


def test_without_pulse_interval_cluster_status_is_not_told_each_pulse(local):
    """Without pulse_interval a dispy node pulses every 10 minutes, so its
    cluster_status hears AvailInfo that often. dispynb's nodes report every second
    (for liveness): before, each report reached the user's callback, 60 calls a
    minute per node. The node's figures are kept fresh all the same."""
    told: list[int] = []

    def cluster_status(status: int, node: object, job: object) -> None:
        told.append(status)

    with JobCluster(abs, nodes=local, cluster_status=cluster_status) as cluster:
        node = cluster.status().nodes[0]
        first = node.update_time
        wait_until(lambda: node.update_time > first)  # a report came
        second = node.update_time
        wait_until(lambda: node.update_time > second)  # and another
    # (closed: the callbacks posted before have run)
    assert DispyNode.AvailInfo not in told, told
    assert told[0] == DispyNode.Initialized


class OnlyWithMemory(NodeAllocate):
    """Uses a node only if it reports available memory (avail_info is passed)."""

    seen: list[object] = []

    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
        OnlyWithMemory.seen.append((avail_info, platform))
        return cpus if avail_info is not None and avail_info.memory > 0 else 0


def test_node_allocate_gets_avail_info_and_platform(local):
    host, port = local.addresses[0]
    spec = OnlyWithMemory(host, port=port)
    with JobCluster(abs, nodes=[spec], secret=local.secret) as cluster:
        assert cluster.submit(-3)() == 3
    avail_info, platform = OnlyWithMemory.seen[-1]
    assert isinstance(avail_info, DispyNodeAvailInfo)
    assert "Linux" in platform


class Refuses(NodeAllocate):
    """Declines every node (its allocate returns 0)."""

    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
        return 0


def setup_tag(tag: str) -> int:
    global TAG
    TAG = tag
    return 0


def tagged() -> str:
    return TAG  # type: ignore[name-defined]


def test_a_node_one_allocation_declines_is_asked_of_the_next(local):
    """dispy asks a cluster's node allocations in turn, those naming a host before
    patterns: a node that one declines (allocate returns 0) goes to the next that
    fits it, with that one's CPUs and setup_args. Before, the node was refused."""
    host, port = local.addresses[0]
    nodes = [
        NodeAllocate("127.0.0.*", port=port, cpus=1, setup_args=("pattern",)),
        Refuses(host, port=port, setup_args=("declined",)),
    ]
    with JobCluster(
        tagged, nodes=nodes, setup=setup_tag, secret=local.secret
    ) as cluster:
        (node,) = cluster.status().nodes
        assert (node.cpus, node.avail_cpus) == (1, 2)
        assert cluster.submit()() == "pattern"


def node_ip() -> str:
    return dispy_node_ip_addr  # type: ignore[name-defined]  # noqa: F821


def test_a_node_named_by_host_name_is_known_by_its_ip_address(local):
    """dispy resolves node names: DispyNode.ip_addr and job.ip_addr are the node's IP
    address, and the node methods take the address as well as the name."""
    _host, port = local.addresses[0]
    named = f"localhost:{port}"
    with JobCluster(node_ip, nodes=[named], secret=local.secret) as cluster:
        (node,) = cluster.status().nodes
        assert node.ip_addr == "127.0.0.1"
        job = cluster.submit()
        assert job() == "127.0.0.1" and job.ip_addr == "127.0.0.1"
        for where in ("127.0.0.1", "localhost", named, f"127.0.0.1:{port}", node):
            pinned = cluster.submit_node(where)
            assert pinned is not None, where
            assert pinned() == "127.0.0.1" and pinned.ip_addr == "127.0.0.1"
        assert cluster.set_node_cpus("127.0.0.1", 1) == 1
        assert cluster.node_jobs("127.0.0.1") == []


def test_setup_timeout_fails_a_setup_that_runs_too_long(local):
    def setup() -> int:
        time.sleep(30)  # type: ignore[name-defined]
        return 0

    # (Without its timeout, the setup would end well, after its 30 s.)
    with pytest.raises(SetupError, match="setup_timeout"):
        JobCluster(abs, nodes=local, setup=setup, setup_timeout=0.5)


def test_logger_has_dispy_level_attributes():
    assert dispynb.logger.DEBUG == 10
    assert dispynb.logger.INFO == 20
    assert dispynb.logger.name == "dispynb"
    # dispy's logger (pycos's) also names two levels as logging's shorthands do:
    # loglevel=dispy.logger.WARN was an AttributeError.
    assert (dispynb.logger.WARN, dispynb.logger.FATAL) == (30, 50)


class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    def scale(self, x: int) -> int:
        return self.factor * x


@pytest.mark.parametrize(
    "computation",
    [
        lambda x: x * 2,
        Scaler(2).scale,
        functools.partial(lambda x, y: x * y, 2),
    ],
    ids=["lambda", "bound-method", "partial"],
)
def test_computations_dispy_could_not_ship_just_work(local, computation):
    with JobCluster(computation, nodes=local) as cluster:
        job = cluster.submit(21)
        assert job.wait(timeout=WAIT)
    assert job.status == DispyJob.Finished, job.exception
    assert job.result == 42


CLIENT = """
import sys
import dispynb as dispy
def compute(n):
    return n * n
if __name__ == "__main__":
    nodes, secret = sys.argv[1].split(","), sys.argv[2]
    cluster = dispy.JobCluster(compute, nodes=nodes, secret=secret)
    jobs = [cluster.submit(i) for i in range(50)]
    cluster.wait()
    print(sum(job.result for job in jobs))
    cluster.close()
"""


def test_several_client_processes_on_one_machine_at_once(local, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    nodes = ",".join(local.node_specs())
    clients = [
        subprocess.Popen(
            [sys.executable, str(script), nodes, local.secret],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for client in clients:
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err
        assert out.strip() == str(sum(i * i for i in range(50)))


def test_shared_job_cluster_runs_on_shared_nodes_beside_another_cluster(local):
    from dispynb import SharedJobCluster

    with (
        SharedJobCluster(abs, nodes=local, client_port=0) as shared,
        JobCluster(lambda x: x + 1, nodes=local) as other,
    ):
        a = [shared.submit(-i) for i in range(20)]
        b = [other.submit(i) for i in range(20)]
        assert shared.wait(timeout=WAIT) and other.wait(timeout=WAIT)
    assert [job.result for job in a] == list(range(20))
    assert [job.result for job in b] == list(range(1, 21))


def test_shared_job_cluster_with_scheduler_host_needs_a_user_credential(local):
    from dispynb import SharedJobCluster
    from dispynb.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="credential"):
        SharedJobCluster(abs, scheduler_host="127.0.0.1", secret="not-a-credential")


def sent_file_mode(name: str) -> tuple[bool, float]:
    import os

    return os.access(name, os.X_OK), os.stat(name).st_mtime


def test_a_program_sent_to_a_node_stays_executable_dated_as_the_guide_says(
    local, tmp_path, monkeypatch
):
    """The migration guide's depends row: dispy kept a sent file's mode and times;
    dispynb's node store keeps a program's execute bit (c3e9a67), not its times."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(tmp_path / "tool.sh", 0o755)
    with JobCluster(
        sent_file_mode, nodes=local, depends=["tool.sh"], secret=local.secret
    ) as cluster:
        executable, mtime = cluster.submit("tool.sh")()
    assert executable
    assert mtime == 946684800.0  # 2000-01-01, as the guide says
