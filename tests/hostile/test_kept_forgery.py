"""Results planted in a node's kept-results spool by another client's job.

A node keeps the results of a client that went away in ``<dest_path>/.kept`` until
it comes back with ``recover_jobs``. Every job on the node runs as the node's user,
so a job of another client (another user of a shared cluster holding the secret,
trusted to run code on the nodes, not on the other clients' machines) can write
there: its forged result, unpickled by the victim's ``recover_jobs``, would run its
code in the victim's process, on the victim's machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from tests.api.crashclient import killed_after, start_client
from tests.api.test_recovery_kept import (
    KEPT_CLIENT,
    kept_files,
    kill_client_with_kept_results,
)
from tests.hostile.tools import RawSession
from tests.jobs import wait_until
from tests.nodeproc import running_node, start_node

pytestmark = pytest.mark.slow

#: Mallory's job: finds the spools beside its own directory, and for each result
#: kept there writes one of its own (a copy of the file whose result, a pickle, runs
#: code as it is loaded: it makes the file ``marker``), over the first and under a
#: new name that sorts first; the copy keeps whatever follows the result's bytes
#: (a replay of a check the node may have added).
FORGER = r"""
import sys
import dispynb as dispy

def forge(marker):
    import os, pickle, struct
    import msgpack

    class Payload:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').close()" % marker,))

    evil = pickle.dumps(Payload())
    here, spools = os.getcwd(), []
    while here != os.path.dirname(here):
        here = os.path.dirname(here)
        if os.path.isdir(os.path.join(here, ".kept")):
            spools = [os.path.join(here, name) for name in os.listdir(here)
                      if name.startswith(".kept") and not name.endswith(".lock")]
            break
    planted = 0
    for spool in spools:
        for comp in os.listdir(spool):
            folder = os.path.join(spool, comp)
            if not os.path.isdir(folder):
                continue
            names = sorted(n for n in os.listdir(folder) if n.startswith("r"))
            for index, name in enumerate(names):
                with open(os.path.join(folder, name), "rb") as handle:
                    data = handle.read()
                (length,) = struct.unpack("<Q", data[8:16])
                header = msgpack.unpackb(data[16:16 + length], raw=False,
                                         strict_map_key=False)
                tail = data[16 + length + sum(header["sizes"]):]
                header["entry"][7] = None
                header["entry"][8] = 1
                header["sizes"], header["kinds"] = [len(evil)], ""
                packed = msgpack.packb(header, use_bin_type=True)
                forged = data[:8] + struct.pack("<Q", len(packed)) + packed + evil
                forged += tail
                if index == 0:  # over a result the node wrote
                    target = name
                else:  # a new one, read first
                    parts = name.split("_")
                    target = "r0" + "_".join(["0" * 28] + parts[1:])
                with open(os.path.join(folder, target), "wb") as handle:
                    handle.write(forged)
                planted += 1
    return planted

node, secret, marker = sys.argv[1:4]
cluster = dispy.JobCluster(forge, nodes=[node], secret=secret)
job = cluster.submit(marker)
print(job(), job.exception or "", flush=True)
cluster.close()
"""

RECOVER = """
import json, sys
import dispynb as dispy
jobs = dispy.recover_jobs(sys.argv[1], timeout=30, secret=sys.argv[2])
print(json.dumps([[job.id, int(job.status), job.result, job.exception]
                  for job in jobs]))
"""


def _recover(tmp_path: Path, journal: Path, secret: str) -> CompletedProcess[str]:
    """`RECOVER` run on ``journal`` in a new process (the client that crashed)."""
    (tmp_path / "recover.py").write_text(RECOVER)
    command = [sys.executable, "recover.py", str(journal), secret]
    return subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=90
    )


@pytest.mark.attack(
    id="kept-result-forgery",
    title="Another client's job plants results in the kept-results spool of a "
    "computation whose client was killed (over one the node wrote, and under new "
    "names), each a pickle that runs code when loaded; then that client calls "
    "recover_jobs",
    goal="no planted result reaches the client: its code never runs there; the "
    "result written over is recovered as lost, with the reason, the others as "
    "they were (was: the planted pickles were unpickled by recover_jobs)",
)
@pytest.mark.timeout(180)
def test_results_planted_in_the_spool_never_reach_the_client(
    tmp_path: Path, measure
) -> None:
    specs = [f"int:{n}" for n in range(3)]
    marker = tmp_path / "mallory-ran-here"
    (tmp_path / "forger.py").write_text(FORGER)
    node = start_node(tmp_path / "node", cpus=len(specs))
    try:
        journal, expected = kill_client_with_kept_results(tmp_path, node, specs)
        wait_until(lambda: len(kept_files(tmp_path / "node")) == len(specs))
        forged = subprocess.run(
            [sys.executable, "forger.py", node.spec, node.secret, str(marker)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert forged.returncode == 0, forged.stderr
        planted = int(forged.stdout.split()[0])
        # Started again (on its port, as its clients know it): it reads its spool.
        assert node.stop() == 0
        (tmp_path / "node" / "port").unlink()
        node = start_node(
            tmp_path / "node", "--port", str(node.port), cpus=1, secret=node.secret
        )
        done = _recover(tmp_path, journal, node.secret)
    finally:
        node.stop(signal.SIGKILL)
    ran = marker.exists()
    assert done.returncode == 0, done.stderr
    jobs = json.loads(done.stdout)
    summary = [
        (job_id, status, value if exception is None else str(exception)[:60])
        for job_id, status, value, exception in jobs
    ]
    measure(
        f"{planted} results planted; their code ran in the client: {ran}; "
        f"recovered: {summary}"
    )
    assert planted == len(specs)
    assert not ran
    # The one written over: lost (it ran), with the reason; the others whole.
    ids = sorted(job_id for job_id, *_rest in jobs)
    assert ids == [f"job-{n}" for n in range(len(specs))], jobs
    for job_id, status, value, exception in jobs:
        n = int(job_id.split("-")[1])
        if exception is None:
            assert (status, value) == (11, expected[n])
        else:
            assert "check" in exception, exception
    assert sum(exception is not None for *_rest, exception in jobs) == 1, jobs


@pytest.mark.attack(
    id="kept-spool-fifo",
    title="A job puts FIFOs in the kept-results spool: as the temporary file of "
    "each computation's meta before its client is killed, and over a result kept "
    "there before the client recovers",
    goal="the node never waits on one: another client is served after the kill, "
    "and recover_jobs gets the other results, the one written over as lost (was: "
    "the node hung for good at the client's death, and at the recovery)",
)
@pytest.mark.timeout(180)
def test_fifos_in_the_spool_never_hang_the_node(tmp_path: Path, measure) -> None:
    specs = [f"int:{n}" for n in range(3)]
    journal, marks, go = tmp_path / "journal.db", tmp_path / "marks", tmp_path / "go"
    marks.mkdir()
    spool = tmp_path / "node" / "dest" / ".kept"
    with running_node(tmp_path / "node", cpus=len(specs)) as node:
        client = start_client(
            tmp_path, KEPT_CLIENT, node.spec, node.secret, str(journal),
            str(marks), str(go), *specs,
        )  # fmt: skip
        with killed_after(client):
            wait_until(lambda: len(list(marks.iterdir())) == len(specs))
            folders = [p for p in spool.iterdir() if p.is_dir()]
            for folder in folders:  # as a job of the node's user can
                os.mkfifo(folder / ".meta.tmp")
        go.touch()
        try:  # the node adopts the computation: it writes its meta
            RawSession.open(node.port, node.secret, timeout=10).close()
            served = "served"
        except OSError as exc:
            served = f"not served ({exc})"
        if served == "served":
            wait_until(lambda: len(kept_files(tmp_path / "node")) == len(specs))
            first = sorted(kept_files(tmp_path / "node"))[0]
            first.unlink()
            os.mkfifo(first)
            done = _recover(tmp_path, journal, node.secret)
            recovered = json.loads(done.stdout) if done.returncode == 0 else []
        else:
            recovered = []
    lost = [job for job in recovered if job[3] is not None]
    measure(
        f"{len(folders)} spool(s) given a FIFO meta.tmp; after the kill: {served}; "
        f"recovered {len(recovered) - len(lost)} results, {len(lost)} as lost"
    )
    assert served == "served"
    assert len(recovered) == len(specs) and len(lost) == 1, recovered
