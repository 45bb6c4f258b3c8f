"""A node that holds the secret but lies to `recover_jobs` about a streamed result.

The fake node (the real listener and handshake, then our own messages) answers the
recovery with chunks announcing an absurd size, or too few chunks, then an entry
marked streamed: the job comes back Terminated, as a crashed job (nothing allocated
for the size), and recover_jobs returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dispynb
from dispynb.job import DispyJob, JobStatus
from dispynb.journal import Journal
from dispynb.protocol.messages import JobResults, Recover, ResultChunk
from dispynb.transport.connection import Connection
from tests.hostile.scripted import ScriptedNode, finished
from tests.transport.util import SECRET, serving_in_thread

KEY = 3


class LyingRecovery(ScriptedNode):
    """Answers a Recover with ``chunks`` (sizes and data), then the job's streamed
    entry (one buffer)."""

    def __init__(self, chunks: list[tuple[int, bytes]]) -> None:
        super().__init__()
        self.chunks = chunks

    def other(self, conn: Connection, message: Any) -> None:
        if isinstance(message, Recover):
            for size, data in self.chunks:
                chunk = ResultChunk(
                    comp_id=message.comp_id, key=KEY, attempt=1, index=0,
                    offset=0, size=size,
                )  # fmt: skip
                conn.write(chunk, [data])
            entry = [*finished(KEY, 1), True]  # streamed
            conn.write(JobResults(comp_id=message.comp_id, results=[entry]))


@pytest.fixture
def lying(request: pytest.FixtureRequest) -> Iterator[int]:
    """The lying node on a loop in a thread (recover_jobs is synchronous)."""
    with serving_in_thread(LyingRecovery(request.param)) as port:
        yield port


def _journal(path: Path, node: str) -> None:
    """A crashed client's journal: one job, sent to ``node``."""
    journal = Journal(str(path))
    journal.computation("r" * 32, "compute")
    journal.node("r" * 32, node)
    journal.submitted("r" * 32, KEY, DispyJob("job", (1,), {}))
    journal.sent("r" * 32, [KEY], node)
    journal.close(remove=False)


@pytest.mark.parametrize(
    "lying",
    [[(1 << 40, b"x")], [(8, b"abcd")]],
    ids=["absurd-size", "chunks-missing"],
    indirect=True,
)
def test_a_lying_streamed_result_ends_the_job_terminated(
    lying: int, tmp_path: Path
) -> None:
    _journal(tmp_path / "journal.db", f"127.0.0.1:{lying}")
    jobs = dispynb.recover_jobs(str(tmp_path / "journal.db"), timeout=20, secret=SECRET)
    assert [(job.id, job.status) for job in jobs] == [("job", JobStatus.Terminated)]
    assert jobs[0].exception == "the result arrived incomplete"
    assert jobs[0].result is None
