"""A user of the shared scheduler acknowledges results as journaled
(`ResultsJournaled`) that are not hers: another user's computation's (the ids she
can guess: every session numbers its computations from 1), or garbage. The
scheduler drops kept results only for the computation's own client, only those it
names: the victim, killed before journaling its results, still recovers them all."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dispynb import LocalCluster, recover_jobs
from dispynb.job import JobStatus
from dispynb.protocol.messages import Error, ResultsJournaled
from dispynb.secret import read_secret_file
from dispynb.transport.connector import connect
from tests.sharedsched.harness import SchedulerProcess, add_user
from tests.sharedsched.test_kept_acks import kill_unjournaled_client

pytestmark = pytest.mark.slow

#: What mallory sends: every computation id alice's client may have, naming every
#: job it may have had, then malformed acknowledgements.
ATTACKS: list[ResultsJournaled] = [
    *(
        ResultsJournaled(comp_id=comp_id, jobs=[[key, 0] for key in range(10)])
        for comp_id in range(5)
    ),
    ResultsJournaled(comp_id=1, jobs=[["1", 0], [1], [1, 0, 0]]),
    ResultsJournaled(comp_id=1, jobs=5),  # type: ignore[arg-type]
    ResultsJournaled(comp_id=1, jobs=[[1.0, 0.0], None]),  # type: ignore[list-item]
]


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[tuple[SchedulerProcess, dict[str, Path]]]:
    """Two real nodes owned by a real scheduler; alice's and mallory's
    credentials."""
    people = {name: add_user(tmp_path, name) for name in ("alice", "mallory")}
    with LocalCluster(nodes=2, cpus=2) as nodes:
        sched = SchedulerProcess(tmp_path, nodes.node_specs(), nodes.secret)
        sched.start()
        try:
            yield sched, people
        finally:
            sched.stop()


async def _acknowledge_others(port: int, credential: Path) -> int:
    """Send `ATTACKS` from mallory's raw session; how many were refused."""
    conn, _ = await connect(
        "127.0.0.1", port, secret=read_secret_file(credential), max_message_size=1 << 20
    )
    try:
        for message in ATTACKS:
            conn.write(message)
        refused = 0
        async with asyncio.timeout(20):
            while refused < len(ATTACKS):
                message, _ = await conn.recv()
                refused += isinstance(message, Error)
        return refused
    finally:
        conn.close()


@pytest.mark.timeout(120)
@pytest.mark.attack(
    id="scheduler-foreign-acks",
    title="A scheduler user acknowledges another's results, or garbage, as journaled",
    goal="each refused; the victim's kept results stay: it recovers all of them",
)
def test_acknowledging_another_users_results_drops_nothing(
    measure: Callable[[str], None],
    shared: tuple[SchedulerProcess, dict[str, Path]],
    tmp_path: Path,
) -> None:
    sched, people = shared
    journal = tmp_path / "journal.db"
    kill_unjournaled_client(sched, people["alice"], journal, tmp_path)
    refused = asyncio.run(_acknowledge_others(sched.port, people["mallory"]))
    assert sched.proc is not None
    alive = sched.proc.poll() is None
    jobs = recover_jobs(str(journal), secret_file=str(people["alice"]), timeout=60)
    results = sorted(job.result for job in jobs)
    measure(
        f"{refused} of {len(ATTACKS)} refused (unknown computation, malformed); "
        f"scheduler alive: {alive}; alice recovered {results}"
    )
    assert refused == len(ATTACKS) and alive
    assert results == [0, 1, 4, 9]
    assert all(job.status == JobStatus.Finished for job in jobs)
