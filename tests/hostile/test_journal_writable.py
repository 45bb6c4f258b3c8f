"""A recovery journal other users can write to (left 0666 by an older version, a
copy under umask 0, a group-writable share): what ``recover_jobs`` unpickles from
it is theirs. The attacker here is ``nobody``, with no capability, writing through
the file's mode only."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import dispynb
from dispynb.errors import ConfigurationError
from dispynb.job import DispyJob, JobStatus
from dispynb.journal import Journal
from tests.hostile.tools import give_by_acl

#: Run as nobody on the journal (argv[1]): every job's result becomes a pickle
#: that makes the directory argv[2] as it is loaded. The journal is left in DELETE
#: mode, nothing of theirs beside it.
_REWRITE = r"""
import os, pickle, sqlite3, sys

class Planted:
    def __reduce__(self):
        return (os.mkdir, (sys.argv[2],))

db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=DELETE")
db.execute("UPDATE jobs SET result = ?", (pickle.dumps(Planted()),))
db.close()
"""

AS_NOBODY_ONLY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
RID = "r" * 32
NOBODY = 65534


def _let_nobody_write(path: Path) -> None:
    """Give user nobody read and write by a POSIX access ACL."""
    give_by_acl(path, NOBODY, 6)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory such as ``/tmp`` (sticky, anyone may make files), that nobody
    can reach (pytest's own are root's, 0700)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("writing as another user needs root and setpriv")
    directory = Path(tempfile.mkdtemp(prefix="dispynb-journal-", dir="/tmp"))
    os.chmod(directory, 0o1777)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def _finished_journal(path: Path, result: int = 42) -> None:
    """A crashed client's journal of one finished job (its ``result``)."""
    journal = Journal(str(path))
    journal.computation(RID, "compute")
    journal.node(RID, "127.0.0.1:1")
    job = DispyJob("job", (1,), {})
    journal.submitted(RID, 1, job)
    job._complete(JobStatus.Finished, result=result)
    journal.done(RID, 1, job)
    journal.close(remove=False)


def _rewritten_as_nobody(path: Path, marker: Path) -> None:
    subprocess.run(
        [*AS_NOBODY_ONLY, "/usr/bin/python3", "-c", _REWRITE, str(path), str(marker)],
        check=True,
        timeout=30,
        capture_output=True,
    )


@pytest.mark.attack(
    id="writable-journal",
    title="Another user rewrites a recovery journal left writable by others (0666, "
    "0660 of their group, or an ACL naming them) as a pickle that runs code, then "
    "its owner recovers",
    goal="recover_jobs and a cluster reusing it refuse it, naming who can write "
    "it; nothing of theirs is unpickled (was: their code ran in recover_jobs)",
)
@pytest.mark.parametrize(
    ("mode", "group"),
    [(0o666, None), (0o660, "nogroup"), (0o600, "acl")],
    ids=["world", "group", "acl"],
)
@pytest.mark.timeout(60)
def test_a_journal_others_can_write_is_refused(measure, shared_dir, mode, group):
    path, marker = shared_dir / "recover.db", shared_dir / "ran"
    _finished_journal(path)
    os.chmod(path, mode)
    if group == "acl":
        _let_nobody_write(path)
    elif group:
        shutil.chown(path, group=group)
    _rewritten_as_nobody(path, marker)
    errors = []
    try:
        jobs = dispynb.recover_jobs(str(path), timeout=5)
        errors.append(f"recovered {[job.result for job in jobs]}")
    except ConfigurationError as exc:
        errors.append(str(exc))
    with pytest.raises(ConfigurationError, match="can be written by") as reused:
        Journal(str(path))
    measure(
        f"{mode:04o}{' ' + group if group else ''}: their code ran: {marker.exists()}; "
        f"recover_jobs: {errors[0].replace(str(path), 'FILE')[:100]}; reused: refused"
    )
    assert not marker.exists()
    assert "can be written by" in errors[0] and str(path) in errors[0]
    assert f"mode {os.stat(path).st_mode & 0o777:04o}" in str(reused.value)


def test_a_journal_writable_by_the_users_own_group_only_is_recovered(shared_dir):
    """umask 002 with user-private groups makes files 0664: a group of the user's
    own, of no other member, is not others."""
    path = shared_dir / "recover.db"
    _finished_journal(path)
    os.chmod(path, 0o660)  # root's group: root is its only user
    journal = Journal.open_existing(str(path))
    assert journal is not None
    try:
        assert [job.result for _key, job, _node in journal.jobs(RID)] == [42]
    finally:
        journal.close()


@pytest.mark.attack(
    id="planted-default-journal",
    title="In a directory others can write to, another user plants a newer "
    "_dispy_* file of theirs, and a symlink named as a newer one to an older "
    "journal of the victim's, before the victim calls recover_jobs()",
    goal="recover_jobs() recovers the victim's newest own journal, naming the files "
    "it skipped (was: it took the newest name: the symlink, recovering the older "
    "journal; or their file, refused)",
)
@pytest.mark.timeout(60)
def test_recover_jobs_skips_default_files_others_planted(
    measure, shared_dir, monkeypatch, caplog
):
    old = shared_dir / "elsewhere" / "_dispy_20200101000000_1"
    old.parent.mkdir()
    _finished_journal(old, result=41)  # the victim's, of another computation
    own = shared_dir / "_dispy_20261207000000_1"
    _finished_journal(own)
    planted = [shared_dir / "_dispy_99999999999999_1", shared_dir / "_dispy_9999_2"]
    subprocess.run(
        [*AS_NOBODY_ONLY, "/usr/bin/python3", "-c",
         "import sys; open(sys.argv[1], 'wb').write(b'theirs')", str(planted[0])],
        check=True, timeout=30,
    )  # fmt: skip
    planted[1].symlink_to(old)
    monkeypatch.chdir(shared_dir)
    try:
        jobs = dispynb.recover_jobs(timeout=5)
        outcome = f"recovered {[job.result for job in jobs]}"
    except ConfigurationError as exc:
        jobs, outcome = [], f"refused: {str(exc)[:80]}"
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    measure(f"{outcome}; {len(skipped)} warning naming the planted files")
    assert [job.result for job in jobs] == [42]
    assert len(skipped) == 1 and all(path.name in skipped[0] for path in planted)
