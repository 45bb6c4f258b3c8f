"""A node of a shared scheduler answers for jobs another node runs.

The scheduler relays what its nodes send to the client, which sees one link (the
scheduler's), not which node ran a job: the scheduler is the one that can tell. A
scripted node (the real listener and handshake, then our own messages) holds the job
it was given and sends results, provisional results, chunks and a file for the
jobs around it, which a real node runs (each waits for a gate file).
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import DispyJob, SharedJobCluster
from dispynb.protocol.messages import (
    FileFromNode,
    JobProvisional,
    JobResults,
    JobSubmit,
    ResultChunk,
)
from dispynb.transport.connection import Connection
from tests.hostile.scripted import ScriptedNode, finished
from tests.hostile.tools import limited_node, wait_for
from tests.sharedsched.harness import SchedulerProcess, add_user
from tests.transport.util import SECRET, serving_in_thread

pytestmark = pytest.mark.slow

FORGED = "forged by the other node"


def gated(n: int, gate: str) -> int:
    """Wait for ``gate`` to exist (60 s at most), return n * n."""
    import os
    import time

    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    return n * n


class ForgingNode(ScriptedNode):
    """Takes jobs and never ends them; a second after the first, for the keys around
    them that it was not given (same attempt), sends a provisional result, a file,
    a result chunk and a result saying `FORGED`."""

    def __init__(self) -> None:
        super().__init__()
        self.given: list[int] = []
        self.forged = 0

    def _forge(self, conn: Connection, comp_id: int, attempt: int) -> None:
        data = pickle.dumps(FORGED)
        given = set(self.given)
        for other in range(max(0, min(given) - 10), max(given) + 11):
            if other in given:
                continue
            conn.write(
                JobProvisional(comp_id=comp_id, key=other, attempt=attempt),
                [data],
            )
            conn.write(
                FileFromNode(comp_id=comp_id, key=other, path="forged.txt"),
                [FORGED.encode()],
            )
            conn.write(
                ResultChunk(
                    comp_id=comp_id, key=other, attempt=attempt, index=0,
                    offset=0, size=len(data), kind="",
                ),
                [data],
            )  # fmt: skip
            entry = finished(other, attempt)
            conn.write(JobResults(comp_id=comp_id, results=[entry]), [data])
            self.forged += 1

    async def jobs(self, conn: Connection, message: JobSubmit) -> None:
        first = not self.given
        for key, _attempt, *_rest in message.jobs:
            self.given.append(key)
        if first:  # once every job went out: for those it was not given
            attempt = message.jobs[0][1]
            asyncio.get_running_loop().call_later(
                1.0, self._forge, conn, message.comp_id, attempt
            )


@pytest.fixture
def forging_node() -> Iterator[tuple[int, ForgingNode]]:
    node = ForgingNode()
    with serving_in_thread(node) as port:
        yield port, node


@pytest.mark.timeout(120)
@pytest.mark.attack(
    id="sched-foreign-results",
    title="A node of a shared scheduler sends results, provisional results, chunks "
    "and files for the jobs another node runs",
    goal="none reaches the client: the other node's jobs end Finished with their own "
    "results, no forged file is saved",
)
def test_a_schedulers_node_cannot_answer_for_another_nodes_jobs(
    forging_node, tmp_path: Path, measure
):
    port, forger = forging_node
    credential = add_user(tmp_path, "alice")
    gate = tmp_path / "gate"
    files = tmp_path / "files"
    files.mkdir()
    with limited_node(tmp_path / "node", secret=SECRET.decode(), cpus=4) as node:
        sched = SchedulerProcess(
            tmp_path, [node.spec, f"127.0.0.1:{port}"], SECRET.decode()
        )
        sched.start()
        try:
            provisional: list[object] = []
            with SharedJobCluster(
                gated,
                scheduler_host=sched.address,
                secret_file=str(credential),
                files_dir=str(files),
                job_status=lambda job: (
                    provisional.append(job.result)
                    if job.status == DispyJob.ProvisionalResult
                    else None
                ),
            ) as cluster:
                jobs = [cluster.submit(n, str(gate)) for n in range(8)]
                wait_for(lambda: forger.forged > 0, "the forging node's job", 30)
                # What it forged reached the client (before), or was dropped.
                wait_for(
                    lambda: (
                        any(j.status == DispyJob.Finished for j in jobs)
                        or "jobs it does not run" in sched.log_text()
                    ),
                    "the forged messages handled",
                    30,
                )
                gate.touch()
                cluster.wait(timeout=15)  # those the forger holds never end
        finally:
            with contextlib.suppress(Exception):
                sched.stop()
    mine = [j for j in jobs if j.status == DispyJob.Finished]
    forged = [j for j in jobs if j.result == FORGED]
    saved = [str(p) for p in files.rglob("forged.txt")]
    measure(
        f"{len(mine)} of {len(jobs)} jobs Finished ({len(jobs) - len(mine)} held "
        f"by the forger), {len(forged)} with a forged result, {len(provisional)} "
        f"provisional results, forged files saved: {saved or 'none'}"
    )
    assert not forged
    assert len(mine) >= 5  # the forger holds 3 at most
    assert all(job.result == n * n for n, job in enumerate(jobs) if job in mine)
    assert FORGED not in provisional
    assert saved == []
