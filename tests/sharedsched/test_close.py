"""`SharedJobCluster.close` (it is `JobCluster.close`) with a node behind the
scheduler that does not answer: bounded as a `JobCluster`'s (tests/api/test_close.py).

A node SIGSTOPped under a running job, a scheduler whose pulse (60 s) declares it
dead only after 3 minutes: ``close(terminate=True)`` gives up after
`dispynb.cluster.TERMINATE_WAIT` (before: after those minutes, longer for a longer
``--pulse_interval``), the job ends Abandoned, and the scheduler serves the next
client.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import DispyJob, SharedJobCluster
from dispynb.cluster import TERMINATE_WAIT
from tests.api.test_close import CLOSING, close_in_thread
from tests.jobs import WAIT, mark_and_sleep, wait_for_path
from tests.nodeproc import CliNode, running_node
from tests.sharedsched.harness import SchedulerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[CliNode]:
    with running_node(tmp_path / "node", name="a") as proc:
        yield proc


def test_close_terminate_gives_up_on_a_stopped_node_behind_the_scheduler(
    tmp_path: Path, users: dict[str, Path], node: CliNode
) -> None:
    sched = SchedulerProcess(
        tmp_path, [node.spec], node.secret, args=("--pulse_interval", "60")
    ).start()
    try:
        cluster = SharedJobCluster(
            mark_and_sleep,
            scheduler_host=sched.address,
            secret_file=str(users["alice"]),
        )
        marker = tmp_path / "started"
        job = cluster.submit(str(marker), 300)
        wait_for_path(marker)
        node.proc.send_signal(signal.SIGSTOP)
        try:
            done, took = close_in_thread(
                cluster, TERMINATE_WAIT + CLOSING, terminate=True
            )
        finally:
            node.proc.send_signal(signal.SIGCONT)
        # True once closed, as dispy's (73c0a29), after TERMINATE_WAIT, not minutes.
        assert done is True, f"close(terminate=True) returned {done} after {took:.0f} s"
        assert took >= TERMINATE_WAIT - 1
        assert job.finish.wait(WAIT)
        assert job.status == DispyJob.Abandoned
        # The scheduler lost nothing: the next client's job runs.
        with SharedJobCluster(
            mark_and_sleep,
            scheduler_host=sched.address,
            secret_file=str(users["bob"]),
        ) as other:
            job2 = other.submit(None, 0)
            assert isinstance(job2(), int), job2.exception
    finally:
        sched.stop()
