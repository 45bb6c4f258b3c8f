"""`Journal`: a client's durable record of its jobs, for ``recover_jobs``.

An SQLite database (WAL) at ``recover_file``: each computation (its recovery id, name,
nodes and where its code came from, to map tracebacks) and each job (id, arguments,
node, status and, once known, its result, output and traceback). It never holds a
secret. A job's row is written before the job is sent, so a client killed at any
point can recover every job it submitted.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sqlite3
import time
import urllib.parse
import weakref
from typing import Any

import cloudpickle

from dispynb.errors import ConfigurationError
from dispynb.job import DispyJob, JobStatus
from dispynb.journalfile import Beside, Shared, checked, refuse_writable, release
from dispynb.secret import foreign_owner

_SCHEMA = """
CREATE TABLE IF NOT EXISTS computations (
    recovery_id TEXT PRIMARY KEY, name TEXT, created REAL);
CREATE TABLE IF NOT EXISTS nodes (
    recovery_id TEXT, address TEXT, PRIMARY KEY (recovery_id, address));
CREATE TABLE IF NOT EXISTS jobs (
    recovery_id TEXT, key INTEGER, job_id BLOB, args BLOB, submit_time REAL,
    status INTEGER, node TEXT, result BLOB, stdout BLOB, stderr BLOB,
    exception TEXT, start_time REAL, end_time REAL,
    PRIMARY KEY (recovery_id, key));
CREATE TABLE IF NOT EXISTS sources (recovery_id TEXT PRIMARY KEY, map TEXT);
"""


class Journal:
    """The recovery journal of one client process (thread-safe)."""

    def __init__(self, path: str) -> None:
        """The journal at ``path``, created readable by its owner only (0600) from
        the start: it holds the jobs' arguments and results. A journal of another
        user's (made first where the client writes its own: a shared directory),
        one other users can write to, or a symlink, is refused; one an older
        version left readable by others is tightened."""
        self.path = path
        beside = None
        try:
            with checked(path, create=True) as file:
                _refuse_foreign(path, file.info)
                refuse_writable(path, file.info, file.fd)
                if file.info.st_mode & 0o077:
                    file.chmod(0o600)
                beside = Beside(os.path.realpath(path), file.info, tighten=True)
                self._use(file.connect(path, isolation_level=None))
            with self._lock:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # survives a crash
                self._db.executescript(_SCHEMA)
                beside.opened(self._db_file())
        except BaseException:
            if hasattr(self, "_release"):
                self._release()
            raise
        finally:
            if beside is not None:
                beside.close()

    def _use(self, shared: Shared) -> None:
        """Use ``shared``, the connection of the process's journals on the file,
        until `close` (or until this journal is garbage)."""
        self._db, self._lock = shared.db, shared.lock
        self._release = weakref.finalize(self, release, shared)
        self._release.atexit = False  # at exit, clusters still close their journals

    def _db_file(self) -> str:
        """The database file's name as SQLite has it (symlinks resolved): its
        ``-wal`` and ``-shm`` are named after it."""
        name: str = self._db.execute("PRAGMA database_list").fetchone()[2]
        return name

    @classmethod
    def open_existing(cls, path: str) -> Journal | None:
        """The journal at ``path``, for ``recover_jobs``; None if the file is empty
        (a client killed as it created it).

        Never creates nor changes a file that is not a journal: any other file (a
        directory, another database, a damaged or truncated one) raises a
        `ConfigurationError` naming it. So does a file replaced as it is opened, one
        other users can write to, or another user's `-wal`, `-shm` or `-journal`
        beside it, or one others can write to (`Beside`).
        """
        if os.path.isdir(path):
            raise ConfigurationError(
                f"recover_file {path!r} is a directory: give the recover_file the "
                "crashed cluster used"
            )
        journal = cls.__new__(cls)
        journal.path = path
        beside = None
        try:
            with checked(path, create=False) as file:
                _refuse_foreign(path, file.info)
                refuse_writable(path, file.info, file.fd)
                if file.info.st_size == 0:
                    return None
                beside = Beside(os.path.realpath(path), file.info, tighten=False)
                uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=rw"
                journal._use(file.connect(uri, uri=True, isolation_level=None))
            with journal._lock:
                tables = {
                    name
                    for (name,) in journal._db.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table'"
                    )
                }
                beside.opened(journal._db_file())
        except (OSError, sqlite3.Error, ConfigurationError) as exc:
            if hasattr(journal, "_release"):
                journal._release()
            if isinstance(exc, ConfigurationError):
                raise
            raise unreadable(path, exc) from None
        finally:
            if beside is not None:
                beside.close()
        if not {"computations", "nodes", "jobs"} <= tables:
            journal.close()
            raise ConfigurationError(
                f"recover_file {path!r} is not a dispynb recovery file (an SQLite "
                "database without its tables): give the recover_file the crashed "
                "cluster used"
            )
        return journal

    def computation(self, recovery_id: str, name: str) -> None:
        """A computation starts."""
        self._run(
            "INSERT OR REPLACE INTO computations VALUES (?, ?, ?)",
            (recovery_id, name, time.time()),
        )

    def sources(self, recovery_id: str, source_map: str) -> None:
        """Where the computation's code comes from (`SourceMap.to_json`), to map
        the tracebacks of jobs recovered after a crash to the script's lines."""
        self._run(
            "INSERT OR REPLACE INTO sources VALUES (?, ?)", (recovery_id, source_map)
        )

    def sources_of(self, recovery_id: str) -> str | None:
        """What `sources` recorded for the computation; None if nothing (or the
        journal is from a version that did not record it)."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT map FROM sources WHERE recovery_id = ?", (recovery_id,)
                ).fetchone()
            except sqlite3.OperationalError:  # no such table: an older journal
                return None
        return row[0] if row else None

    def node(self, recovery_id: str, address: str) -> None:
        """The computation is set up on a node."""
        self._run("INSERT OR IGNORE INTO nodes VALUES (?, ?)", (recovery_id, address))

    def submitted(self, recovery_id: str, key: int, job: DispyJob) -> None:
        """A job was submitted (before it is sent anywhere)."""
        self._run(
            "INSERT OR REPLACE INTO jobs (recovery_id, key, job_id, args, submit_time,"
            " status) VALUES (?, ?, ?, ?, ?, ?)",
            (
                recovery_id,
                key,
                _dump(job.id),
                _dump((job._args, job._kwargs)),
                job.submit_time,
                int(JobStatus.Created),
            ),
        )

    def sent(self, recovery_id: str, keys: list[int], node: str) -> None:
        """Jobs were sent to a node (one message): recorded in one transaction, not
        one each (an SQLite commit costs some 60 us)."""
        running = int(JobStatus.Running)
        self._run_many(
            "UPDATE jobs SET status = ?, node = ? WHERE recovery_id = ? AND key = ?",
            [(running, node, recovery_id, key) for key in keys],
        )

    def renamed(self, recovery_id: str, key: int, job: DispyJob) -> None:
        """The user gave a job another id (dispy's ``job.id = ...`` after submit)."""
        self._run(
            "UPDATE jobs SET job_id = ? WHERE recovery_id = ? AND key = ?",
            (_dump(job.id), recovery_id, key),
        )

    def done(self, recovery_id: str, key: int, job: DispyJob) -> None:
        """A job ended (its id, final status, result, output and traceback)."""
        self.done_many(recovery_id, [(key, job)])

    def done_many(self, recovery_id: str, jobs: list[tuple[int, DispyJob]]) -> None:
        """Jobs ended (``(key, job)`` each): recorded in one transaction, all or
        none, not one commit each (the results of one message from a node). A job
        that ran records the host that ran it (``job.ip_addr``) as its node: one
        behind a shared scheduler was sent to the scheduler. An ``Abandoned`` one
        keeps the address it was sent to: the node (or scheduler) that was lost
        may have run it on, its result kept for `recover_jobs` to ask for."""
        abandoned = JobStatus.Abandoned
        rows = [
            (
                _dump(job.id),
                int(job.status),
                _dump(job.result),
                _dump(job.stdout),
                _dump(job.stderr),
                job.exception,
                job.start_time,
                job.end_time,
                None if job.status is abandoned else job.ip_addr,
                recovery_id,
                key,
            )
            for key, job in jobs
        ]
        self._run_many(
            "UPDATE jobs SET job_id = ?, status = ?, result = ?, stdout = ?,"
            " stderr = ?, exception = ?, start_time = ?, end_time = ?,"
            " node = COALESCE(?, node) WHERE recovery_id = ? AND key = ?",
            rows,
        )

    def computations(self) -> list[tuple[str, str, list[str]]]:
        """``(recovery_id, name, node addresses)`` of every recorded computation."""
        with self._lock:
            rows = self._db.execute(
                "SELECT recovery_id, name FROM computations"
            ).fetchall()
            out = []
            for recovery_id, name in rows:
                nodes = self._db.execute(
                    "SELECT address FROM nodes WHERE recovery_id = ?", (recovery_id,)
                ).fetchall()
                out.append((recovery_id, name, [n for (n,) in nodes]))
        return out

    def jobs(self, recovery_id: str) -> list[tuple[int, DispyJob, str | None]]:
        """``(key, job, node)`` for each job of a computation, as recorded."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, job_id, args, submit_time, status, node, result, stdout,"
                " stderr, exception, start_time, end_time FROM jobs"
                " WHERE recovery_id = ? ORDER BY key",
                (recovery_id,),
            ).fetchall()
        jobs = []
        for (
            key,
            job_id,
            args,
            submit,
            status,
            node,
            result,
            out,
            err,
            exc,
            t0,
            t1,
        ) in rows:
            job_args, job_kwargs = _load(args)
            job = DispyJob(_load(job_id), job_args, job_kwargs)
            job._key = key
            job.submit_time = submit
            if JobStatus(status).is_final:
                job._complete(
                    JobStatus(status),
                    result=_load(result),
                    stdout=_load(out),
                    stderr=_load(err),
                    exception=exc,
                    start_time=t0,
                    end_time=t1,
                )
            jobs.append((key, job, node))
        return jobs

    def shared(self, recovery_id: str) -> bool:
        """Whether the file records computations other than ``recovery_id`` (of
        another cluster, maybe in another process, given the same file)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM computations WHERE recovery_id != ? LIMIT 1",
                (recovery_id,),
            ).fetchone()
        return row is not None

    def forget(self, recovery_id: str) -> None:
        """A computation closed cleanly: nothing of it is left to recover."""
        for table in ("jobs", "nodes", "sources", "computations"):
            self._run(f"DELETE FROM {table} WHERE recovery_id = ?", (recovery_id,))

    def close(self, remove: bool = False) -> None:
        """Close the database (and delete it, after a clean shutdown). Another
        journal of the process on the same file keeps their connection open."""
        self._release()
        if remove:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path + suffix)

    def _run(self, sql: str, values: tuple[Any, ...]) -> None:
        with self._lock:
            self._db.execute(sql, values)

    def _run_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """``sql`` for each row, in one transaction (one commit: some 60 us on a
        busy machine, the most of a record's cost); a single row autocommits."""
        if not rows:
            return
        with self._lock:
            if len(rows) == 1:
                self._db.execute(sql, rows[0])
                return
            self._db.execute("BEGIN")
            try:
                self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk: SQLITE_FULL).
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise


def unreadable(path: str, exc: BaseException) -> ConfigurationError:
    """The error for a recovery file that cannot be read (what, and which file)."""
    if isinstance(exc, sqlite3.DatabaseError):
        what = "is damaged or not a dispynb recovery file"
    else:
        what = "cannot be read"
    return ConfigurationError(f"recover_file {path!r} {what}: {exc}")


def _refuse_foreign(path: str, info: os.stat_result) -> None:
    """Raise `ConfigurationError` if the journal ``path`` (``info``: its stat) is
    another user's: its owner would read the jobs' arguments and results, and could
    put there what `recover_jobs` unpickles."""
    foreign = foreign_owner(info)
    if foreign:
        raise ConfigurationError(
            f"recover_file {path!r} belongs to {foreign}, who could read the jobs' "
            "arguments and results and change what recover_jobs unpickles: give a "
            "file of your own"
        )


#: Types `pickle` writes by value, as cloudpickle does (exactly these types, not
#: subclasses, which may be classes of ``__main__``).
_PLAIN = frozenset({int, float, complex, str, bytes, bool, type(None)})


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is plain data: a `_PLAIN` value, or a small tuple, list or
    dict (string keys) of them, two levels deep at most (a job's ``(args,
    kwargs)``)."""
    kind = type(value)
    if kind in _PLAIN:
        return True
    if kind not in (tuple, list, dict) or depth >= 2 or len(value) > 16:
        return False
    if kind is dict:
        return all(type(k) is str and _plain(v, depth + 1) for k, v in value.items())
    return all(_plain(item, depth + 1) for item in value)


def _dump(value: Any) -> bytes | None:
    if value is None:
        return None
    if _plain(value):
        # pickle itself: cloudpickle's Pickler costs some 2 us to make, per value,
        # and a job's record has up to four (its id, result, stdout, stderr).
        return pickle.dumps(value, protocol=5)
    data: bytes = cloudpickle.dumps(value, protocol=5)  # by value, like the jobs
    return data


def _load(data: bytes | None) -> Any:
    if data is None:
        return None
    return pickle.loads(data)  # our own journal file
