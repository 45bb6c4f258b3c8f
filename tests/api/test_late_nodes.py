"""Named nodes that start after the client, as a lab's batch script starts them.

dispy used a named node whenever it came up (the node announced itself, or the
client's ``ping_interval`` pinged it again); dispynb tries such a node again in the
background, and with ``ping_interval`` waits for it. Nodes are ``dispynb-node``
processes on 127.0.0.1, on ports held until they start (`tests.ports`).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from tests.jobs import WAIT, wait_until
from tests.nodeproc import NODE_WAIT, CliNode, running_node, start_node
from tests.ports import PortHolder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

SECRET = "late-nodes-secret-7c1e9a"


def node_name() -> str:
    return dispy_node_name  # type: ignore[name-defined]  # noqa: F821


def refused(caplog: pytest.LogCaptureFixture, spec: str) -> bool:
    """Whether the client has logged that nothing listens at ``spec``."""
    return any(
        spec in record.getMessage() and "cannot be used" in record.getMessage()
        for record in caplog.records
    )


def test_a_named_node_started_after_the_cluster_is_used(
    tmp_path: Path, held_port: PortHolder, caplog: pytest.LogCaptureFixture
) -> None:
    """One of two named nodes is not up when JobCluster() connects; it starts a
    moment later and runs the jobs given to it (before: it was dropped for good)."""
    caplog.set_level(logging.WARNING, logger="dispynb")
    late_spec = f"127.0.0.1:{held_port()}"
    with running_node(tmp_path / "early", secret=SECRET, name="early") as early:
        cluster = JobCluster(node_name, nodes=[early.spec, late_spec], secret=SECRET)
        late: CliNode | None = None
        try:
            assert refused(caplog, late_spec)
            assert [node.name for node in cluster.status().nodes] == ["early"]
            late = start_node(
                tmp_path / "late",
                "--port", late_spec.rsplit(":", 1)[1],
                secret=SECRET,
                name="late",
            )  # fmt: skip
            wait_until(lambda: len(cluster.status().nodes) == 2, timeout=NODE_WAIT)
            late_node = next(n for n in cluster.status().nodes if n.name == "late")
            job = cluster.submit_node(late_node)
            assert job is not None and job(), job
            assert job.status == DispyJob.Finished and job.result == "late"
        finally:
            cluster.close()
            if late is not None:
                assert late.stop() == 0


def test_with_ping_interval_jobcluster_waits_for_a_named_node_not_up_yet(
    tmp_path: Path, held_port: PortHolder, caplog: pytest.LogCaptureFixture
) -> None:
    """dispy's ``ping_interval`` pings the named nodes again: JobCluster() waits for
    its only node, which starts after the client found nothing there (without it,
    JobCluster() stops at once, saying that no node listens)."""
    caplog.set_level(logging.WARNING, logger="dispynb")
    spec = f"127.0.0.1:{held_port()}"
    made: list[JobCluster | BaseException] = []

    def make() -> None:
        try:
            made.append(
                JobCluster(node_name, nodes=[spec], secret=SECRET, ping_interval=1)
            )
        except BaseException as exc:  # reported by the test's thread
            made.append(exc)

    maker = threading.Thread(target=make)
    maker.start()
    node: CliNode | None = None
    try:
        wait_until(lambda: refused(caplog, spec) or bool(made))
        assert not made, made  # it neither failed nor found a node yet
        node = start_node(
            tmp_path / "node", "--port", spec.rsplit(":", 1)[1], secret=SECRET
        )
        maker.join(WAIT + NODE_WAIT)
        assert made and isinstance(made[0], JobCluster), made
        cluster = made[0]
        try:
            job = cluster.submit()
            assert job() == "cli-node" and job.status == DispyJob.Finished
        finally:
            cluster.close()
    finally:
        maker.join(WAIT + NODE_WAIT)
        if made and isinstance(made[0], JobCluster):
            made[0].close()
        if node is not None:
            assert node.stop() == 0
