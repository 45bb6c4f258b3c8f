"""``--save_config FILE`` that cannot be written (no such directory, a directory,
a full disk), for ``dispynb-node`` and ``dispynb-scheduler``: one line saying why
and what to do, exit 2, the file as it was and no temporary file left."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.nodeproc import node_env

PROGRAMS = {"dispynb-node": "nodeserver", "dispynb-scheduler": "schedserver"}


def _limit_file_size() -> None:
    """A file system that takes 8 bytes more, as a full one (EFBIG, not ENOSPC:
    the same failing write); Python ignores SIGXFSZ."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (8, 8))


def _save(
    program: str, target: Path, full: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", PROGRAMS[program], "--save_config", str(target),
         "--zombie_interval", "2"],
        env=node_env(), capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, preexec_fn=_limit_file_size if full else None,
    )  # fmt: skip


def _refused(
    done: subprocess.CompletedProcess[str], program: str, target: Path, why: str
) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(
        f"{program}: cannot save the configuration to {str(target)!r}: {why}; give a "
        "file in a directory that exists"
    ), done.stderr
    assert ".tmp" not in done.stderr  # the temporary file's name means nothing


@pytest.mark.parametrize("program", PROGRAMS)
def test_save_config_where_it_cannot_be_written_says_why(tmp_path, program):
    """It was a traceback (the node) or a temporary file's name (the scheduler)."""
    target = tmp_path / "missing" / "saved.ini"
    _refused(_save(program, target), program, target, "No such file or directory")
    _refused(_save(program, tmp_path), program, tmp_path, "Is a directory")
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("program", PROGRAMS)
def test_save_config_on_a_full_disk_leaves_the_file_as_it_was(tmp_path, program):
    target = tmp_path / "saved.ini"
    target.write_text("[DEFAULT]\nzombie_interval = 5.0\n")
    _refused(_save(program, target, full=True), program, target, "File too large")
    assert target.read_text() == "[DEFAULT]\nzombie_interval = 5.0\n"
    assert [p.name for p in tmp_path.iterdir()] == ["saved.ini"]
