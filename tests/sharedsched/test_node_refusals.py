"""What the scheduler's log says of a named node it cannot use: once per outage,
and again when the node answers with a refusal its settings cause."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.nodeproc import running_node
from tests.ports import held_ports
from tests.sharedsched.harness import SchedulerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SECRET = "the-nodes-secret-0123456789abcdef0123456789"


def test_a_node_up_after_the_scheduler_with_another_secret_is_said(
    tmp_path: Path,
) -> None:
    """A named node not up yet when the scheduler starts (one warning: nothing
    listens there, trying again), then started with another secret: the
    scheduler retried in silence (each retry at debug level), its users' jobs
    waiting 'for a node to come up', and nothing said why."""
    with held_ports() as ports:
        port = ports()
        # Named in args: start() would wait for the node up.
        sched = SchedulerProcess(
            tmp_path, [], SECRET, args=("-n", f"127.0.0.1:{port}")
        ).start()
        try:
            sched.wait_for_log("is dispynb-node running there? (trying again)")
            ports.close()  # the node's, now
            with running_node(
                tmp_path / "node", "--port", str(port), secret="another-" + SECRET
            ):
                sched.wait_for_log(
                    f"node 127.0.0.1:{port}: the client's proof is wrong: it uses "
                    "another secret than this node; give the scheduler the nodes' "
                    "secret (--node_secret_file or DISPYNB_SECRET) (trying again)"
                )
        finally:
            sched.stop()
    log = sched.log_text()
    assert log.count("the client's proof is wrong") == 1, log  # not each retry
