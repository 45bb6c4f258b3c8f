"""A node's connection for one computation ends while the node stays up (its
control connection open): the scheduler sets the computation up there again, as a
`JobCluster` reconnects to a node it lost, and the jobs run.

Was: the computation never used that node again (it was set up on a node only when
the node's control connection came up), and with no other node its jobs waited for
ever; the client's close, waiting for them, hung. Met in CI by the node fuzzer
(`tests/fuzz/test_servers.py`) when a fuzzed message ended a computation's link.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from dispynb import DispyJob, SharedJobCluster
from dispynb.protocol.messages import JobResults, JobSubmit
from dispynb.transport.connection import Connection
from tests.hostile.scripted import ScriptedNode, finished
from tests.hostile.test_scheduler import people
from tests.sharedsched.harness import SchedulerProcess
from tests.transport.util import SECRET, serving_in_thread

pytestmark = pytest.mark.slow

__all__ = ["people"]  # the fixture


def _square(n: int) -> int:
    return n * n


class _DropsFirstLink(ScriptedNode):
    """A node that closes the first connection a computation's jobs come on (as a
    node whose handler of it failed, or a link a firewall cut), without a word; on
    later ones each job's result is the square of its key."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    async def jobs(self, conn: Connection, message: JobSubmit) -> None:
        if not self.dropped:
            self.dropped += 1
            conn.close()
            return
        for key, attempt, *_rest in message.jobs:
            conn.write(
                JobResults(comp_id=message.comp_id, results=[finished(key, attempt)]),
                [pickle.dumps(key * key)],
            )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "not-reentrant"])
def test_a_computation_whose_link_to_a_live_node_ended_is_set_up_there_again(
    tmp_path: Path, people: dict[str, Path], reentrant: bool
) -> None:
    node = _DropsFirstLink()
    with (
        serving_in_thread(node) as port,
        SchedulerProcess(tmp_path, [f"127.0.0.1:{port}"], SECRET.decode()) as sched,
    ):
        with SharedJobCluster(
            _square,
            scheduler_host=sched.address,
            secret_file=str(people["alice"]),
            reentrant=reentrant,
        ) as cluster:
            jobs = [cluster.submit(n) for n in range(4)]
            for job in jobs:
                job.future.exception(timeout=30)
        log = sched.log_text()
    # The node answers with the square of each job's key (1 to 4), not its argument.
    statuses = [job.status for job in jobs]
    assert node.dropped == 1
    if reentrant:  # the job on the dropped link ran again
        assert statuses == [DispyJob.Finished] * 4, statuses
        assert [job.result for job in jobs] == [1, 4, 9, 16]
    else:  # those sent on it ended Abandoned, as dispy's do on a lost node; the
        # others (the node takes as many at once as it has CPUs) ran
        abandoned = statuses.count(DispyJob.Abandoned)
        assert 0 < abandoned < 4, statuses
        assert statuses.count(DispyJob.Finished) == 4 - abandoned, statuses
    assert "set up there again" in log, log[-3000:]
    assert "Traceback" not in log
