"""Files planted beside a recover_file, where others can write (``/tmp``, a shared
directory): SQLite uses the ``-wal``, ``-shm`` and ``-journal`` named after the
database it opens, whoever's they are (a ``-journal`` is even rolled back into it)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys

import pytest

import dispynb.journal as journal_module
from dispynb.errors import ConfigurationError
from dispynb.journal import Journal
from tests.hostile.tools import AS_NOBODY
from tests.nodeproc import ROOT, node_env

COMPANIONS = ["-wal", "-shm", "-journal"]

#: A transaction killed midway: its ``-journal`` holds the pages of a database
#: whose only row is 'THEIRS', which SQLite rolls back into the file it names.
_KILLED_TRANSACTION = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=DELETE")
db.execute("CREATE TABLE computations (recovery_id TEXT, name TEXT, created REAL)")
db.execute("INSERT INTO computations VALUES ('THEIRS', 'f', 0)")
db.execute("PRAGMA cache_size=1")
db.execute("BEGIN")
db.execute("UPDATE computations SET recovery_id = 'spilled'")
db.execute("INSERT INTO computations SELECT randomblob(3000), '', 0 FROM "
           "(SELECT 1 UNION SELECT 2 UNION SELECT 3)")
os._exit(0)
"""


def _planted(tmp_path, suffix: str) -> bytes:
    """What an attacker puts beside a journal as ``suffix``: a hot journal for
    ``-journal``, bytes for the others."""
    if suffix != "-journal":
        return b"planted " * 512
    theirs = tmp_path / "attacker" / "theirs.db"
    theirs.parent.mkdir()
    subprocess.run(
        [sys.executable, "-c", _KILLED_TRANSACTION, str(theirs)], check=True, timeout=30
    )
    return (tmp_path / "attacker" / "theirs.db-journal").read_bytes()


def _open(path: str, opening: str) -> None:
    if opening == "recovery":
        journal = Journal.open_existing(path)
        assert journal is not None
    else:
        journal = Journal(path)
    journal.computations()
    journal.close()


def _ours(path: str) -> list[str]:
    journal = Journal.open_existing(path)
    assert journal is not None
    try:
        return [recovery_id for recovery_id, _name, _nodes in journal.computations()]
    finally:
        journal.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
@pytest.mark.parametrize("opening", ["new", "reopened", "recovery"])
@pytest.mark.parametrize("suffix", COMPANIONS)
def test_a_file_of_another_user_beside_a_recover_file_is_refused(
    tmp_path, suffix, opening
):
    """Their -wal got the jobs' arguments and results (the chmod to 0600 left it
    theirs); their -journal was rolled back into the journal as it was opened:
    recover_jobs then unpickled what they chose."""
    path = str(tmp_path / "recover.db")
    if opening != "new":
        journal = Journal(path)
        journal.computation("ours", "f")
        journal.close()
    planted = _planted(tmp_path, suffix)
    with open(path + suffix, "wb") as file:
        file.write(planted)
    os.chown(path + suffix, 65534, -1)
    os.chmod(path + suffix, 0o666)
    with pytest.raises(ConfigurationError, match=r"beside it, of .*65534"):
        _open(path, opening)
    with open(path + suffix, "rb") as file:
        assert file.read() == planted  # neither written nor rolled back
    os.unlink(path + suffix)
    if opening != "new":
        assert _ours(path) == ["ours"]


@pytest.mark.parametrize("suffix", COMPANIONS)
def test_a_symlink_beside_a_recover_file_is_refused_and_not_followed(tmp_path, suffix):
    """The journal's -wal and -shm were chmod 0600 by name: a symlink there made
    the file it names (a script of the user's, say) 0600."""
    path = str(tmp_path / "recover.db")
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    os.symlink(script, path + suffix)
    with pytest.raises(ConfigurationError, match="beside it, a symlink"):
        Journal(path)
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    assert script.read_text() == "#!/bin/sh\n"


#: A client that plants a file of another user as its journal's -wal as SQLite
#: opens the journal (argv: the journal, the planted file, the opening).
_PLANTED_AS_IT_OPENS = """
import os, sqlite3, sys
import dispynb.journal as journal_module
from dispynb.errors import ConfigurationError
from dispynb.journal import Journal
from tests.hostile.tools import AS_NOBODY
from tests.nodeproc import ROOT, node_env

path, theirs, opening = sys.argv[1:]
journal = Journal(path)
journal.computation("ours", "f")
journal.close()
connect = sqlite3.connect

def planting_connect(*args, **kwargs):
    os.rename(theirs, path + "-wal")
    return connect(*args, **kwargs)

journal_module.sqlite3.connect = planting_connect
try:
    journal = Journal.open_existing(path) if opening == "recovery" else Journal(path)
except ConfigurationError as exc:
    print(exc)
else:
    journal.computation("mine", "f")
    print("used")
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="another user needs root and setpriv",
)
@pytest.mark.parametrize("opening", ["reopened", "recovery"])
def test_a_wal_planted_as_sqlite_opens_the_journal_is_refused(tmp_path, opening):
    """Planted after the check, before SQLite opens its -wal: seen once it did, so
    no job is written there (nor read from there). The client is not root (SQLite
    run by root makes such a file root's). (SQLite replaces a -wal beside a new,
    empty database: no harm there.)"""
    os.chmod(tmp_path, 0o777)
    theirs = tmp_path / "theirs"
    theirs.write_bytes(b"planted")
    os.chown(theirs, 1000, 1000)
    done = subprocess.run(
        [*AS_NOBODY, sys.executable, "-c", _PLANTED_AS_IT_OPENS,
         str(tmp_path / "recover.db"), str(theirs), opening],
        capture_output=True, text=True, cwd=ROOT, env=node_env(), timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "-wal' beside it, of " in done.stdout and "1000" in done.stdout


#: Another user: told (a line on its standard input), it moves its hot journal in
#: as the victim's -journal, and says whether it could (argv: from, to).
_ATTACKER = """
import os, sys
source, target = sys.argv[1:]
sys.stdin.readline()
try:
    os.rename(source, target)
    print("planted", flush=True)
except OSError as exc:
    print("refused", exc.errno, flush=True)
"""

#: uid 1000, reaching into the test's private folders (not past a sticky bit).
AS_ANOTHER_USER = [
    "setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
    "--inh-caps=+dac_override", "--ambient-caps=+dac_override",
]  # fmt: skip


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="another user needs root and setpriv",
)
def test_a_hot_journal_planted_as_sqlite_opens_the_journal_is_not_rolled_back(
    tmp_path, monkeypatch
):
    """In a sticky directory (as /tmp), planted after the check, before SQLite looked
    for one: it was rolled back into the journal before the second check could see
    it, and recover_jobs unpickled what its owner chose. An empty -journal of the
    client's is there first now, which nobody else may replace."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    path = str(shared / "recover.db")
    journal = Journal(path)
    journal.computation("ours", "f")
    journal.close()
    theirs = shared / "theirs"
    theirs.write_bytes(_planted(tmp_path, "-journal"))
    os.chown(theirs, 1000, 1000)
    attacker = subprocess.Popen(
        [*AS_ANOTHER_USER, sys.executable, "-c", _ATTACKER, str(theirs),
         path + "-journal"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert attacker.stdin is not None and attacker.stdout is not None
    said = []
    connect = journal_module.sqlite3.connect

    def racing_connect(*args, **kwargs):
        attacker.stdin.write("now\n")
        attacker.stdin.flush()
        said.append(attacker.stdout.readline().strip())
        return connect(*args, **kwargs)

    monkeypatch.setattr(journal_module.sqlite3, "connect", racing_connect)
    try:
        assert _ours(path) == ["ours"]
    finally:
        monkeypatch.undo()
        attacker.communicate(timeout=30)
    assert said == [f"refused {errno.EPERM}"]
    assert not os.path.exists(path + "-journal")  # the client's own, gone
