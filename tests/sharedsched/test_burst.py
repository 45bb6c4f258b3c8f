"""A burst of setups through a real dispynb-scheduler: many computations set up at
the same moment (by two users) must all be set up and run, although each node admits
only a few handshakes at once from the scheduler's one address."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb.transport.admission import MAX_PENDING_PER_SOURCE
from tests.sharedsched.harness import SchedulerProcess, finish_client, start_client

pytestmark = pytest.mark.slow

#: A client (``ADDRESS CREDENTIAL COUNT``) that sets COUNT `SharedJobCluster`s up
#: at once, from threads released together, runs two jobs on each and prints JSON
#: with each cluster's results (or its setup error).
BURST_CLIENT = """
import json, sys, threading
from dispynb import SharedJobCluster

def double(n):
    return 2 * n

address, credential, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
gate = threading.Barrier(count)
outcomes = [None] * count

def one(index):
    gate.wait(timeout=30)
    try:
        with SharedJobCluster(
            double, scheduler_host=address, secret_file=credential
        ) as cluster:
            jobs = [cluster.submit(index * 10 + k) for k in range(2)]
            outcomes[index] = [job() for job in jobs]
            if None in outcomes[index]:
                outcomes[index] = [(int(j.status), j.exception) for j in jobs]
    except Exception as exc:
        outcomes[index] = f"{type(exc).__name__}: {exc}"

threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(timeout=60)
print(json.dumps({"outcomes": outcomes}))
"""


def test_burst_of_setups_all_succeed(
    scheduler: SchedulerProcess, users: dict[str, Path], tmp_path: Path
) -> None:
    """Two users set up, at the same moment, more computations each than a node
    admits handshakes from one address: every setup succeeds and every job runs
    (the scheduler queues its connections to a node rather than fail them)."""
    count = MAX_PENDING_PER_SOURCE + 2
    procs = {
        name: start_client(
            BURST_CLIENT,
            scheduler.address,
            str(users[name]),
            str(count),
            cwd=tmp_path,
            name=f"burst_{name}",
        )
        for name in ("alice", "bob")
    }
    for name, proc in procs.items():
        outcomes = finish_client(proc, timeout=90)["outcomes"]
        expected = [[2 * (i * 10), 2 * (i * 10 + 1)] for i in range(count)]
        assert outcomes == expected, (name, outcomes, scheduler.log_text()[-3000:])
