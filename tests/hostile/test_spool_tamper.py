"""Damaged kept-result files: a node's spool (``<dest_path>/.kept``) holds the
results of a client that went away, until it recovers them. A file there may be
torn (the machine stopped while it was written), damaged on the disk, or written
by something else of the node's user (a job runs as that user): it must cost its
own result only, said clearly, never the others' nor the recovery."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from nodeserver.keptresults import LOST_REASON
from nodeserver.spoolfile import MAGIC
from tests.api.test_recovery_kept import (
    LIMIT,
    RECOVER_KEPT,
    kept_files,
    kill_client_with_kept_results,
)
from tests.jobs import wait_until
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow


def _spooled(header: object) -> bytes:
    """A spool file holding ``header`` (well framed, whatever it says)."""
    packed = msgpack.packb(header, use_bin_type=True)
    return MAGIC + struct.pack("<Q", len(packed)) + packed


#: What each damaged file is made to hold: torn, not msgpack, and well-formed
#: files whose entry is not one a node writes.
DAMAGES = {
    "torn": lambda data: data[: len(data) // 2],
    "garbage": lambda data: MAGIC + b"\xff" * 64,
    "short file entry": lambda data: _spooled({"entry": ["file"], "sizes": []}),
    "empty entry": lambda data: _spooled({"entry": [], "sizes": []}),
    "short entry": lambda data: _spooled({"entry": [0, 1], "sizes": []}),
    "missing buffer": lambda data: _spooled(
        {"entry": [0, 1, "finished", 0.0, 0.0, "", "", None, 1], "sizes": []}
    ),
    "bad text": lambda data: _spooled(
        {"entry": [0, 1, "finished", 0.0, 0.0, {}, [], 5, 0], "sizes": []}
    ),
}


@pytest.mark.attack(
    id="spool-damaged",
    title=f"{len(DAMAGES)} of a node's kept-result files are damaged before their "
    "client recovers them (torn, garbage, well-formed msgpack holding entries a "
    "node never writes)",
    goal="each of those jobs recovered as lost, with the reason; the other "
    "results all recovered (was: a malformed entry ended the recovery, the "
    "results after it never sent)",
)
@pytest.mark.timeout(180)
def test_damaged_kept_results_cost_only_their_own(tmp_path: Path, measure) -> None:
    count = len(DAMAGES) + 2
    specs = [f"int:{n}" for n in range(count)]
    (tmp_path / "recover.py").write_text(RECOVER_KEPT)
    with running_node(tmp_path / "node", cpus=count) as node:
        journal, expected = kill_client_with_kept_results(tmp_path, node, specs)
        wait_until(lambda: len(kept_files(tmp_path / "node")) == count)
        files = sorted(kept_files(tmp_path / "node"))
        # The first kept intact: the damaged ones come between results that are not.
        damaged = files[1 : len(DAMAGES) + 1]
        for path, damage in zip(damaged, DAMAGES.values(), strict=True):
            path.write_bytes(damage(path.read_bytes()))
        done = subprocess.run(
            [sys.executable, "recover.py", str(journal), node.secret, str(LIMIT)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert done.returncode == 0, done.stderr
    jobs = {job_id: rest for job_id, *rest in json.loads(done.stdout)}
    lost = [job for job, (_status, _value, exc) in jobs.items() if exc == LOST_REASON]
    measure(
        f"{len(lost)} of {len(damaged)} damaged results recovered as lost, "
        f"{len(jobs) - len(lost)} of {count - len(damaged)} others recovered"
    )
    assert len(jobs) == count, (jobs, done.stderr)
    assert len(lost) == len(damaged), jobs
    for n in range(count):
        status, value, exception = jobs[f"job-{n}"]
        if exception != LOST_REASON:
            assert (status, value, exception) == (11, expected[n], None)
