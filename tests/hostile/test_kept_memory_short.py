"""A node short of memory when a client comes back for its kept results.

A node sends a kept result from its file, mapped; a node whose address space is
nearly all taken (its own limit, strict overcommit: squeezed by what else runs)
cannot map it for the moment. It reported the result lost, and then deleted it
with the others, as collected: the next ``recover_jobs``, once memory was back,
found nothing. A real ``dispynb-node`` whose address space is lowered (prlimit(2))
after it kept the result."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.test_recovery_kept import (
    LIMIT,
    RECOVER_KEPT,
    kept_files,
    kill_client_with_kept_results,
)
from tests.jobs import wait_until
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow

MiB = 1 << 20
#: The kept result, and the address space the node gets over what it uses then.
RESULT = 128 * MiB
SLACK = 48 * MiB


def _address_space(pid: int, field: str = "VmSize") -> int:
    """The process's address space now (or at its peak: ``VmPeak``), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(field + r":\s+(\d+) kB", status)
    assert match, status
    return int(match[1]) * 1024


def _recover(tmp_path: Path, journal: Path, secret: str) -> list[list[object]]:
    done = subprocess.run(
        [sys.executable, "recover.py", str(journal), secret, str(LIMIT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _said(jobs: list[list[object]]) -> str:
    (job,) = jobs
    _id, status, value, exception = job
    return f"status {status}, " + (
        f"{value[0]} of {value[1]} bytes" if isinstance(value, list) else str(exception)
    )


@pytest.mark.attack(
    id="kept-result-memory-short",
    title=f"A client recovers a kept result of {RESULT // MiB} MiB from a node "
    f"whose address space is then {SLACK // MiB} MiB over what it uses "
    "(prlimit --as); then again once the limit is lifted",
    goal="the first recover_jobs is told the node is short of memory, and the "
    "result stays kept; the second gets it whole (was: recovered as lost, then "
    "deleted: the second found nothing)",
)
@pytest.mark.timeout(180)
def test_a_node_short_of_memory_keeps_the_result_it_cannot_read(
    tmp_path: Path, measure
) -> None:
    (tmp_path / "recover.py").write_text(RECOVER_KEPT)
    with running_node(tmp_path / "node") as node:
        journal, expected = kill_client_with_kept_results(
            tmp_path, node, [f"bytes:{RESULT}"]
        )
        wait_until(lambda: len(kept_files(tmp_path / "node")) == 1)
        pid = node.proc.pid
        # The node lets go of the result's memory once it is in the file, just after
        # the file appears: squeezed before that, the limit left room to map it.
        wait_until(
            lambda: _address_space(pid) < _address_space(pid, "VmPeak") - RESULT // 2
        )
        limits = resource.prlimit(pid, resource.RLIMIT_AS)
        squeezed = _address_space(pid) + SLACK
        resource.prlimit(pid, resource.RLIMIT_AS, (squeezed, limits[1]))
        try:
            first = _recover(tmp_path, journal, node.secret)
        finally:
            resource.prlimit(pid, resource.RLIMIT_AS, limits)
        left = len(kept_files(tmp_path / "node"))
        second = _recover(tmp_path, journal, node.secret)
    measure(
        f"squeezed: {_said(first)[:160]}; kept files left: {left}; lifted: "
        f"{_said(second)[:100]}"
    )
    assert left == 1
    assert "memory" in str(first[0][3]), first
    assert second == [["job-0", 11, expected[0], None]], second
