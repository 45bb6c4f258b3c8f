"""A ``dispynb-scheduler`` frozen (SIGSTOP) long enough for its client to declare
it dead, then thawed: the client, back on a new session, sets its computation up
again.

The jobs the client gave up (they ended ``Abandoned``) must not run on for nobody
on the shared nodes: the one running is stopped, the one queued never starts. A
real node and scheduler from the command line; the client in this process.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from dispynb import SharedJobCluster
from tests.chaos.onenode import scheduler_over_one_node
from tests.chaos.outcomes import assert_abandoned, hold_two, wait_stopped
from tests.chaos.test_frozen_node import mark_and_hold

pytestmark = pytest.mark.slow


@pytest.mark.timeout(90)
def test_jobs_a_client_gave_up_at_a_thawed_scheduler_are_stopped(
    tmp_path: Path,
) -> None:
    """Before, the scheduler kept them for the client's recovery, an hour: the
    running one ran to its end, then the queued one started, on a shared CPU."""
    marks, release = tmp_path / "marks", tmp_path / "release"
    marks.mkdir()
    try:
        with (
            scheduler_over_one_node(tmp_path) as (scheduler, credential),
            SharedJobCluster(
                mark_and_hold,
                scheduler_host=scheduler.address,
                secret_file=str(credential),
                pulse_interval=0.2,
                recover_file=str(tmp_path / "journal"),
            ) as cluster,
        ):
            assert scheduler.proc is not None
            jobs, worker = hold_two(cluster, marks, release)
            scheduler.proc.send_signal(signal.SIGSTOP)
            try:
                assert cluster.wait(timeout=30)
            finally:
                scheduler.proc.send_signal(signal.SIGCONT)
            assert_abandoned(jobs, f"scheduler {scheduler.address} was lost (")
            wait_stopped(worker)
            release.touch()
            assert cluster.submit(2, str(marks), str(release))() == 4
    finally:
        release.touch()
    assert not (marks / "1").exists(), "a job reported Abandoned ran afterwards"
    assert "the jobs it left are terminated" in scheduler.log_text()
