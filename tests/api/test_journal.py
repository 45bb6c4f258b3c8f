"""The recovery journal: private to its owner (0600 for the file, -wal and -shm),
and what arrives together is recorded together."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time

import pytest

from dispynb import JobCluster
from dispynb.backends import base
from dispynb.backends.base import ClusterConfig, JobEvents, JobRequest
from dispynb.errors import ConfigurationError
from dispynb.job import DispyJob, JobStatus
from dispynb.journal import Journal
from tests.engines import ThreadBackend, ThreadEngine


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_journal_and_its_wal_and_shm_are_0600_even_under_umask_0(tmp_path):
    path = str(tmp_path / "recover.db")
    old = os.umask(0)  # the loosest a user could have: nothing may rely on umask
    try:
        journal = Journal(path)
        journal.computation("rid", "compute")
        journal.submitted("rid", 1, DispyJob(None, (1,), {}))
        for suffix in ("", "-wal", "-shm"):
            assert _mode(path + suffix) == 0o600, suffix
        journal.close()
    finally:
        os.umask(old)


def test_a_loose_existing_journal_is_tightened(tmp_path):
    path = tmp_path / "recover.db"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    Journal(str(path)).close()
    assert _mode(str(path)) == 0o600


def test_jobs_sent_together_are_recorded_together(tmp_path):
    """A node's message of jobs is one transaction: each is recorded sent to it."""
    journal = Journal(str(tmp_path / "recover.db"))
    journal.computation("rid", "compute")
    for key in range(4):
        journal.submitted("rid", key, DispyJob(key, (key,), {}))
    journal.sent("rid", [0, 2, 3], "10.0.0.1:9711")
    recorded = {key: node for key, _job, node in journal.jobs("rid")}
    journal.close()
    node = "10.0.0.1:9711"
    assert recorded == {0: node, 1: None, 2: node, 3: node}


class _PairsBackend(ThreadBackend):
    """Ends every two jobs submitted together, in one `JobEvents.batch`: as the
    results of one message from a node reach the cluster."""

    def __init__(self, events: JobEvents, config: ClusterConfig) -> None:
        super().__init__(events, config)
        self._waiting: list[JobRequest] = []

    def submit(self, job: JobRequest) -> None:
        self._waiting.append(job)
        if len(self._waiting) == 2:
            pair, self._waiting = self._waiting, []
            self._report(self._end_together, pair)

    def _end_together(self, pair: list[JobRequest]) -> None:
        assert callable(self._func)
        with self._events.batch():
            for job in pair:
                result = self._func(*job.args, **job.kwargs)
                now = time.time()
                outcome = base.Outcome(
                    JobStatus.Finished, result, "", "", None, now, now
                )
                self._events.job_done(job.key, self.node, outcome)


class _PairsEngine(ThreadEngine):
    features = frozenset({base.RECOVERY})

    def open(self, events: JobEvents, config: ClusterConfig) -> ThreadBackend:
        return _PairsBackend(events, config)


def _double(x: int) -> int:
    return 2 * x


def test_results_that_arrive_together_are_journaled_together(tmp_path):
    """The ends of one batch are one transaction, and each job's callback runs once
    its end is journaled (what a crashed client's recover_jobs then returns)."""
    path = str(tmp_path / "recover.db")
    journaled_at_callback: dict[int, JobStatus] = {}

    def job_status(job: DispyJob) -> None:
        reader = Journal.open_existing(path)
        assert reader is not None
        ((recovery_id, _name, _nodes),) = reader.computations()
        recorded = {j.id: j.status for _key, j, _node in reader.jobs(recovery_id)}
        reader.close()
        journaled_at_callback[job.id] = recorded[job.id]

    statements: list[str] = []
    with JobCluster(
        _double, engine=_PairsEngine(), recover_file=path, job_status=job_status
    ) as cluster:
        db = cluster._journal._journal._db
        db.set_trace_callback(statements.append)
        jobs = [cluster.submit(i) for i in range(4)]
        assert [job() for job in jobs] == [0, 2, 4, 6]
        cluster.wait(timeout=10)
        db.set_trace_callback(None)
    assert journaled_at_callback == {job.id: JobStatus.Finished for job in jobs}
    done = [s for s in statements if s.startswith("UPDATE jobs SET job_id")]
    assert len(done) == 4
    assert statements.count("COMMIT") == 2  # two pairs: two transactions


def test_a_jobs_values_load_back_as_they_were_plain_or_not(tmp_path):
    """Plain data (written by pickle itself) and the rest (cloudpickle: by value,
    as a class no module has) are read back alike by recover_jobs."""

    class Point:  # not importable anywhere: pickle alone cannot write it
        def __init__(self, x: int) -> None:
            self.x = x

    class Count(int):  # an int subclass: by value, not as a plain int
        pass

    journal = Journal(str(tmp_path / "recover.db"))
    journal.computation("rid", "compute")
    cases = {
        1: ((1, "a", [2.5, None, True]), {"k": b"x", "c": 1j}),
        2: ((Point(3),), {}),
        3: ((Count(4), {5: "int key"}), {"deep": [[[1]]]}),
    }
    for key, (args, kwargs) in cases.items():
        job = DispyJob(f"job{key}", args, kwargs)
        journal.submitted("rid", key, job)
        job._complete(JobStatus.Finished, result=args[0], stdout="out", stderr="")
        journal.done("rid", key, job)
    loaded = {key: job for key, job, _node in journal.jobs("rid")}
    journal.close()
    assert loaded[1]._args == cases[1][0] and loaded[1]._kwargs == cases[1][1]
    assert loaded[1].result == 1 and loaded[1].stdout == "out"
    assert type(loaded[2].result).__name__ == "Point" and loaded[2].result.x == 3
    assert type(loaded[3].result).__name__ == "Count" and loaded[3].result == 4
    assert loaded[3]._args[1] == {5: "int key"}
    assert loaded[3]._kwargs == {"deep": [[[1]]]}


def test_the_end_of_a_job_whose_submission_was_not_written_is_not_journaled(
    tmp_path, monkeypatch, caplog
):
    """A disk nearly full fails some writes and not others: a job whose row was
    never written has its end's update change nothing, so its end must not count
    as journaled (the node would drop a result no journal holds)."""
    from dispynb.clusterjournal import ClusterJournal

    journal = ClusterJournal(str(tmp_path / "recover.db"), None, can_recover=True)
    first, second = DispyJob(None, (1,), {}), DispyJob(None, (2,), {})
    journal.submitted(1, first)
    real = Journal.submitted

    def full(self: Journal, *args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Journal, "submitted", full)
    journal.submitted(2, second)
    monkeypatch.setattr(Journal, "submitted", real)
    assert journal.done_many([(1, first)])
    assert not journal.done_many([(1, first), (2, second)])
    warnings = [r for r in caplog.records if "recovery file" in r.getMessage()]
    assert len(warnings) == 1 and "disk is full" in warnings[0].getMessage()
    journal.close(clean=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_a_journal_of_another_user_is_neither_written_nor_recovered(tmp_path):
    """Made first where the client writes its journal (a shared directory), it was
    used: its owner read the jobs' arguments and results, and could put there what
    recover_jobs unpickles."""
    from dispynb import recover_jobs

    path = tmp_path / "recover.db"
    Journal(str(path)).close()  # a real journal...
    os.chown(path, 65534, -1)  # ...of another user's
    with pytest.raises(ConfigurationError, match=r"belongs to .*65534"):
        Journal(str(path))
    with pytest.raises(ConfigurationError, match=r"belongs to .*65534"):
        recover_jobs(str(path))
    os.symlink(path, tmp_path / "link.db")
    with pytest.raises(OSError):  # not followed, whoever's it names
        Journal(str(tmp_path / "link.db"))


@pytest.mark.parametrize("opening", ["new", "existing"])
def test_a_journal_swapped_for_a_symlink_as_sqlite_opens_it_is_refused(
    tmp_path, monkeypatch, opening
):
    """The file was checked (ours, no symlink), then SQLite opened it again by path:
    a symlink to another user's file put there in between, and taken away at once,
    was followed (their file then held the jobs, and what recover_jobs unpickles)."""
    import dispynb.journal as journal_module

    path, theirs = tmp_path / "recover.db", tmp_path / "theirs.db"
    Journal(str(path)).close()
    Journal(str(theirs)).close()
    before = theirs.read_bytes()
    connect = sqlite3.connect

    def swapping_connect(target, *args, **kwargs):
        os.rename(path, tmp_path / "aside.db")
        os.symlink(theirs, path)
        try:
            return connect(target, *args, **kwargs)
        finally:  # there and back: the path names our file again
            os.unlink(path)
            os.rename(tmp_path / "aside.db", path)

    monkeypatch.setattr(journal_module.sqlite3, "connect", swapping_connect)
    with pytest.raises(ConfigurationError, match="was replaced"):
        if opening == "new":
            Journal(str(path)).computation("mine", "f")
        else:
            Journal.open_existing(str(path))
    monkeypatch.undo()
    assert theirs.read_bytes() == before
    assert not os.path.exists(str(theirs) + "-wal")


def test_a_journal_is_used_through_the_file_checked(tmp_path):
    """The check does not refuse the journal itself, new or existing, nor its
    recovery while the client that writes it still runs."""
    path = str(tmp_path / "recover.db")
    writer = Journal(path)
    writer.computation("rid", "f")
    for _ in range(2):  # a reader closing keeps the writer's locks (fcntl's)
        reader = Journal.open_existing(path)
        assert reader is not None and reader.computations()[0][:2] == ("rid", "f")
        reader.close()
    writer.close()
    again = Journal(path)
    assert again.computations()[0][0] == "rid"
    again.close()


_COUNT_JOBS = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
print(db.execute("SELECT count(*) FROM jobs").fetchone()[0])
db.close()
"""


def _jobs_seen_by_another_process(path: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _COUNT_JOBS, path],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return int(done.stdout)


@pytest.mark.parametrize("second", ["writer", "reader"])
def test_a_second_journal_on_the_file_leaves_the_first_ones_records_to_recover(
    tmp_path, second
):
    """Closing any descriptor of a file drops every fcntl lock the process holds on
    it: a second journal of this process on the file (two clusters given one
    recover_file, or recover_jobs while a cluster writes it) dropped the first's, so
    another process reading the file took its WAL away as it closed, and what the
    first recorded afterwards was lost to recover_jobs."""
    path = str(tmp_path / "recover.db")
    first = Journal(path)
    first.computation("rid", "f")
    other = Journal(path) if second == "writer" else Journal.open_existing(path)
    assert other is not None
    other.close()
    assert _jobs_seen_by_another_process(path) == 0
    first.submitted("rid", 1, DispyJob(None, (1,), {}))
    assert _jobs_seen_by_another_process(path) == 1
    first.close()


@pytest.mark.parametrize(
    ("where", "hint"),
    [
        ("missing/recover.db", "give one in a directory that exists"),
        (".", "give one that is a file, not a directory"),
    ],
)
def test_a_recover_file_that_cannot_be_made_says_what_to_give_instead(
    tmp_path, where, hint
):
    """It said "give one on a disk with room" whatever kept it from being made."""
    path = str(tmp_path / where)
    with pytest.raises(ConfigurationError) as raised:
        JobCluster(abs, nodes=["127.0.0.1:9"], secret="s" * 32, recover_file=path)
    assert str(raised.value).startswith(f"recover_file {path!r} cannot be written: ")
    assert str(raised.value).endswith(f"; {hint}, or recover_file=False")


def test_a_forked_child_opens_the_journal_with_a_connection_of_its_own(tmp_path):
    """The journals of a process on one file share its SQLite connection: a child
    forked from it (multiprocessing's default) got its parent's, which SQLite
    forbids using across a fork."""
    path = str(tmp_path / "recover.db")
    parent = Journal(path)
    parent.computation("rid", "f")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: says whether it has a connection of its own
        try:
            child = Journal(path)
            own = child._db is not parent._db and child.computations()[0][0] == "rid"
            child.close()
            os.write(write, b"own" if own else b"parent's")
        finally:
            os._exit(0)
    os.close(write)
    try:
        said = os.read(read, 64)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert said == b"own"
    parent.computation("rid2", "g")  # the parent's goes on
    assert [rid for rid, _name, _nodes in parent.computations()] == ["rid", "rid2"]
    parent.close()
