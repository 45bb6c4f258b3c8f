"""The fault-tolerance page's recovery, followed as written: a client with
``recover_file`` killed, then the page's ``recover_jobs`` sample run, and run again."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.test_recovery import kill_client_mid_run
from tests.docs.test_howto import ROOT, _blocks
from tests.nodeproc import running_node

PAGE = ROOT / "docs" / "explanation" / "fault-tolerance.md"


def _run_sample(sample: str, cwd: Path) -> list[str]:
    (cwd / "recover.py").write_text(sample, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "recover.py"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_pages_recovery_sample_run_twice_returns_the_jobs_twice(
    tmp_path: Path,
) -> None:
    """The page said a recovery that found every job removed the file, so that a
    script recovering once more got nothing: a named ``recover_file`` stays, and a
    second run returns the same jobs, as the page now says."""
    text = PAGE.read_text(encoding="utf-8")
    (sample,) = [b for b in _blocks(text, "python") if "recover_jobs(" in b]
    with running_node(tmp_path / "node", cpus=20) as node:
        journal = kill_client_mid_run(tmp_path, node, started=20)
        sample = sample.replace('"jobs.journal"', repr(str(journal)))
        sample = sample.replace(
            '"/home/me/.dispynb-secret"', repr(str(node.secret_file))
        )
        first = _run_sample(sample, tmp_path)
        second = _run_sample(sample, tmp_path)
    assert first == [f"job-{n} 11 {n * n}" for n in range(20)]
    assert second == first
    assert journal.exists()
    prose = " ".join(text.split())
    assert "run again, it returns the same jobs" in prose
    assert not re.search(r"recovery that found every job removed it", prose)
