"""``recover_jobs``: the jobs of a client that crashed, with their results.

A `JobCluster` given ``recover_file`` journals every job (id, arguments, node, state,
result) there, and its nodes keep running its jobs and keep their results for an hour
if the client goes away. `recover_jobs` reads the journal in a new process, asks each
node for the results of jobs that had not ended (authenticating with the same secret),
and returns every job of the journal, each once.

This module reads the journal and merges the nodes' answers into it; the
conversation with one node is `dispynb.recoverynodes`, applying what it sends
`dispynb.recoveryresults`, the files and provisional results `dispynb.recoverysent`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import ssl
import sys
from collections.abc import Iterable
from typing import Any

from dispynb._loop import LoopRunner
from dispynb.clusterjournal import DEFAULT_PREFIX, latest_recover_file
from dispynb.codeoptions import _check_files_dir
from dispynb.defaults import MAX_MESSAGE_SIZE, PRE_AUTH_MAX_FRAME
from dispynb.errors import ConfigurationError
from dispynb.job import DispyJob, JobStatus
from dispynb.journal import Journal, unreadable
from dispynb.options import check_size
from dispynb.recoverynodes import (
    RECOVERY_PULSE,
    RECOVERY_SILENCE,
    TERMINATE_WAIT,
    _collect_from,
    _Deadline,
    _Limits,
    _recover_from,
)
from dispynb.secret import resolve_secret
from dispynb.tracebacks import SourceMap
from dispynb.transport.addressing import parse_address
from dispynb.transport.tls import client_context

__all__ = ["RECOVERY_PULSE", "RECOVERY_SILENCE", "TERMINATE_WAIT", "recover_jobs"]

logger = logging.getLogger(__name__)


def recover_jobs(
    recover_file: str | None = None,
    timeout: float | None = None,
    terminate_pending: bool = False,
    *,
    secret: str | bytes | None = None,
    secret_file: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    cafile: str | None = None,
    max_message_size: int = MAX_MESSAGE_SIZE,
    max_result_size: int | str | None = None,
    files_dir: str | None = None,
) -> list[DispyJob]:
    """Recover the jobs of a client that crashed (dispy's function).

    Parameters
    ----------
    recover_file:
        The ``recover_file`` the crashed `JobCluster` was given. None (dispy's
        default) takes the newest ``_dispy_*`` file of the current directory, the
        one a cluster given no ``recover_file`` writes; it is removed once every
        result was collected. Its jobs were not journaled: each is returned as the
        nodes kept it, with ``id`` None and no arguments (as dispy's are). A file
        that does not exist (or no ``_dispy_*`` file) logs a warning and returns
        ``[]``, as dispy's does; one that is not a journal raises
        `ConfigurationError`.
    timeout:
        Seconds to wait for jobs still running on the nodes; None waits until they
        end. Jobs still running then are returned with status ``Running``. A node
        that sends nothing for ``RECOVERY_SILENCE`` s (stopped, hung, cut off) is
        given up: its jobs are returned ``Abandoned``, saying so, and the next
        call asks it again.
    terminate_pending:
        As in dispy: the jobs still running on the nodes when ``timeout`` passes
        are terminated there (the nodes are free for other work at once) and
        returned ``Terminated`` (queued ones ``Cancelled``), once their nodes say
        so, within ``TERMINATE_WAIT`` s; False (the default) lets them run on,
        their results kept for a later call. No effect without a ``timeout``
        (every job is waited for).
    secret, secret_file, certfile, keyfile, cafile:
        As for `JobCluster` (the journal never holds the secret; by default it comes
        from ``DISPYNB_SECRET`` or ``DISPYNB_SECRET_FILE``).
    max_message_size:
        Largest message (bytes) accepted from a node, as for `JobCluster`. A kept
        result that does not fit in one comes in chunks, assembled in place. (A
        dispynb-scheduler relays results in the messages its nodes sent them.)
    max_result_size:
        Bytes a recovered result may have (int, or a size such as ``"4G"``); a
        larger one ends ``Crashed`` ('the result arrived incomplete'). Default
        None: any result the node kept, up to this machine's memory.
    files_dir:
        Folder where the files jobs sent with ``dispy_send_file`` that their node
        (or scheduler) kept for this client are saved, at the paths the jobs sent
        them to, as the crashed cluster's ``files_dir`` (default: the current
        directory). A job that has not ended when this returns shows its latest
        provisional result (status ``ProvisionalResult``), if it sent one.

    Returns
    -------
    list of DispyJob
        Every job of the journal, in submission order, each exactly once, with its
        ``id``, arguments (``job._args``, ``job._kwargs``) and final status, result,
        output and traceback where known. A job that was never sent to a node ends
        ``Abandoned``.
    """
    default = recover_file is None
    if recover_file is None:
        recover_file = latest_recover_file()
        if recover_file is None:
            logger.warning(
                "no recovery file (%s*) in %s: nothing to recover; give the "
                "recover_file the crashed client used",
                DEFAULT_PREFIX,
                os.getcwd(),
            )
            return []
    elif not os.path.exists(recover_file):
        # dispy says so and returns no job: a script recovering once more (its file
        # removed by the last recovery) goes on.
        logger.warning(
            "recover_file %r does not exist: nothing to recover; give the "
            "recover_file the crashed client used",
            recover_file,
        )
        return []
    limits = _limits(max_message_size, max_result_size, files_dir)
    key = resolve_secret(secret, secret_file)
    tls = client_context(certfile, keyfile, cafile) if (certfile or cafile) else None
    journal = Journal.open_existing(recover_file)
    if journal is None:
        logger.warning("recover_file %r is empty: nothing to recover", recover_file)
        return []
    try:
        jobs, complete = _recover(
            journal, key, tls, _Deadline(timeout, terminate_pending), limits
        )
    except sqlite3.Error as exc:
        journal.close()
        raise unreadable(recover_file, exc) from None
    except BaseException:
        journal.close()  # the file stays as it was, for another try
        raise
    journal.close(remove=default and complete)
    return jobs


def _recover(
    journal: Journal,
    key: bytes | None,
    tls: ssl.SSLContext | None,
    timeout: _Deadline,
    limits: _Limits,
) -> tuple[list[DispyJob], bool]:
    """Every job of ``journal``, and whether none is left to recover later.

    What is known for sure is written to the journal; not a node that could not be
    reached (stopped, restarting, cut off): its jobs are returned Abandoned, saying
    why, and the next `recover_jobs` asks it again.
    """
    complete = True
    # The process's one I/O loop, as clusters use: it works from any thread, also
    # under a running loop (a notebook cell), where asyncio.run refuses to start.
    runner = LoopRunner.acquire()
    try:
        jobs: list[DispyJob] = []
        for recovery_id, _name, nodes in journal.computations():
            sources = _source_map(journal, recovery_id)
            recorded = journal.jobs(recovery_id)
            if not recorded:  # jobs not journaled (default file): take what nodes kept
                for address in nodes:
                    first = len(jobs)
                    complete &= runner.run_sync(
                        _collect_from,
                        address,
                        recovery_id,
                        key,
                        tls,
                        timeout,
                        jobs,
                        limits,
                    )
                    _map_tracebacks(jobs[first:], sources)
                continue
            waiting: dict[str, dict[int, DispyJob]] = {}
            # Jobs the client gave up with their node (Abandoned): by key, their
            # place in ``jobs``; asked for again (`_given_up_on`).
            given_up: dict[int, int] = {}
            for job_key, job, node in recorded:
                jobs.append(job)
                if job.done():
                    if node is not None:  # as when its result came from the node
                        job.ip_addr = parse_address(node)[0]
                    lost_with = _given_up_on(job, node, nodes)
                    if lost_with is not None:
                        given_up[job_key] = len(jobs) - 1
                        asked = waiting.setdefault(lost_with, {})
                        asked[job_key] = _asked_again(job)
                    continue
                if node is None:
                    job._complete(
                        JobStatus.Abandoned,
                        exception="not yet sent to a node when the client stopped",
                    )
                    journal.done(recovery_id, job_key, job)
                else:
                    # Sent to that node: Running, as dispy's job once sent (the
                    # journal keeps no more; it stays so if still running at the
                    # timeout).
                    job.status = JobStatus.Running
                    job.ip_addr = parse_address(node)[0]
                    waiting.setdefault(node, {})[job_key] = job
            for node, pending in waiting.items():
                settled = runner.run_sync(
                    _recover_from,
                    node,
                    recovery_id,
                    pending,
                    key,
                    tls,
                    timeout,
                    limits,
                )
                _map_tracebacks(pending.values(), sources)
                for job_key, job in pending.items():
                    if job_key in given_up:
                        if _node_had(job):
                            jobs[given_up[job_key]] = job
                        if job.done() and _node_had(job):
                            journal.done(recovery_id, job_key, job)
                    elif job.done() and job_key in settled:
                        journal.done(recovery_id, job_key, job)
                    else:
                        complete = False
        return jobs, complete
    finally:
        runner.release()


def _given_up_on(job: DispyJob, node: str | None, nodes: list[str]) -> str | None:
    """The node (``host:port``) a job the client recorded ``Abandoned`` was lost
    with, to ask for its result again, or None (never sent, or ended otherwise).

    A node lost for the client (cut off, frozen) may have run the job on and kept
    its result for an hour: the result exists, and the user wants it. A journal
    written before the address was kept for such jobs holds only the host: the
    computation's node on that host, if one only."""
    if job.status is not JobStatus.Abandoned or node is None:
        return None
    if node in nodes:
        return node
    on_host = [address for address in nodes if parse_address(address)[0] == node]
    return on_host[0] if len(on_host) == 1 else None


def _node_had(asked: DispyJob) -> bool:
    """Whether the node answered for a job `_asked_again`: its end (not one this
    call gave it for want of the node), its start or a provisional result (it
    runs there still). A job it never named keeps what the journal recorded."""
    if asked.done():
        return asked.status is not JobStatus.Abandoned
    return asked.start_time is not None or asked.status is JobStatus.ProvisionalResult


def _asked_again(job: DispyJob) -> DispyJob:
    """A copy of ``job`` (recorded ``Abandoned``) waiting for its node's answer:
    ``Running`` there, as a job sent to a node is once recovered."""
    asked = DispyJob(job.id, job._args, job._kwargs)
    asked._key = job._key
    asked.submit_time = job.submit_time
    asked.status = JobStatus.Running
    asked.ip_addr = job.ip_addr
    return asked


def _source_map(journal: Journal, recovery_id: str) -> SourceMap | None:
    """Where the computation's code came from, as its cluster recorded it."""
    text = journal.sources_of(recovery_id)
    if text is None:
        return None
    try:
        return SourceMap.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:  # only the lines are lost
        logger.debug("source map of %s unreadable: %s", recovery_id, exc)
        return None


def _map_tracebacks(jobs: Iterable[DispyJob], sources: SourceMap | None) -> None:
    """Point the recovered jobs' remote tracebacks at the script's lines, as the
    cluster does for the jobs it sees end (`dispynb.tracebacks`)."""
    if sources is None:
        return
    for job in jobs:
        if job.exception and isinstance(job.exception, str):
            job.exception = sources.rerender(job.exception)


def _limits(max_message_size: Any, max_result_size: Any, files_dir: Any) -> _Limits:
    """Check `recover_jobs`'s size arguments (as `JobCluster` checks its own) and
    its ``files_dir``."""
    message = check_size(max_message_size, "max_message_size")
    if message is None or message < PRE_AUTH_MAX_FRAME:
        raise ConfigurationError(
            f"max_message_size must be a number of bytes, at least "
            f"{PRE_AUTH_MAX_FRAME}; got {max_message_size!r}"
        )
    result = check_size(max_result_size, "max_result_size")
    if result is None:  # what the node kept: bounded by what this machine can hold
        try:
            result = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            result = sys.maxsize
    return _Limits(message, result, _check_files_dir(files_dir))
