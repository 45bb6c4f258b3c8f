"""A burst of setups through a real dispynb-scheduler: many computations set up at
the same moment (by two users) must all be set up and run, although each node admits
only a few handshakes at once from the scheduler's one address."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dispynb.transport.admission import MAX_PENDING_PER_SOURCE
from tests.sharedsched.harness import SchedulerProcess, finish_client, start_client

pytestmark = pytest.mark.slow

#: Seconds the burst (every setup and job of a client) may take: some 3 s on a
#: loaded machine. Its client then says which clusters are still pending, and where.
DEADLINE = 30.0

#: A client (``ADDRESS CREDENTIAL COUNT DEADLINE``) that sets COUNT
#: `SharedJobCluster`s up at once, from threads released together, runs two jobs
#: on each and prints JSON with each cluster's results (or its setup error). What
#: is not done within DEADLINE seconds is named with its thread's stack, and the
#: client exits with status 1: it never waits for ever.
BURST_CLIENT = """
import json, os, sys, threading, time, traceback
from dispynb import SharedJobCluster

def double(n):
    return 2 * n

address, credential, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = float(sys.argv[4])
gate = threading.Barrier(count)
outcomes = [None] * count

def one(index):
    try:
        gate.wait(timeout=deadline)
        with SharedJobCluster(
            double, scheduler_host=address, secret_file=credential
        ) as cluster:
            jobs = [cluster.submit(index * 10 + k) for k in range(2)]
            outcomes[index] = [job() for job in jobs]
            if None in outcomes[index]:
                outcomes[index] = [(int(j.status), j.exception) for j in jobs]
    except Exception as exc:
        outcomes[index] = f"{type(exc).__name__}: {exc}"

threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
for thread in threads:
    thread.start()
end = time.monotonic() + deadline
for thread in threads:
    thread.join(max(0.0, end - time.monotonic()))
frames = sys._current_frames()
pending = [i for i, thread in enumerate(threads) if thread.is_alive()]
for i in pending:
    frame = frames.get(threads[i].ident)
    stack = "".join(traceback.format_stack(frame)[-8:]) if frame else "?"
    outcomes[i] = f"still pending after {deadline:g} s, at:" + chr(10) + stack
    sys.stderr.write(f"cluster {i}: {outcomes[i]}")
print(json.dumps({"outcomes": outcomes}), flush=True)
if pending:
    sys.stderr.flush()
    os._exit(1)  # its clusters' threads may be stuck too: ended here, said why
"""


@pytest.mark.timeout(90)  # the nodes and the scheduler start first (slow under load)
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
            str(DEADLINE),
            cwd=tmp_path,
            name=f"burst_{name}",
        )
        for name in ("alice", "bob")
    }
    # Both run at once: one bound for both (their start, the burst, their exit).
    limit = time.monotonic() + DEADLINE + 20.0
    try:
        for name, proc in procs.items():
            left = max(1.0, limit - time.monotonic())
            outcomes = finish_client(proc, timeout=left)["outcomes"]
            expected = [[2 * (i * 10), 2 * (i * 10 + 1)] for i in range(count)]
            assert outcomes == expected, (name, outcomes, scheduler.log_text()[-3000:])
    finally:  # the other client too, if one failed
        for proc in procs.values():
            if proc.stdout is not None and not proc.stdout.closed:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()
