"""``recover_jobs``: the jobs of a client that crashed, with their results.

A `JobCluster` given ``recover_file`` journals every job (id, arguments, node, state,
result) there, and its nodes keep running its jobs and keep their results for an hour
if the client goes away. `recover_jobs` reads the journal in a new process, asks each
node for the results of jobs that had not ended (authenticating with the same secret),
and returns every job of the journal, each once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from typing import Any

from dispynb.errors import ConfigurationError, DispynbError, SerializationError
from dispynb.job import DispyJob, JobStatus
from dispynb.journal import Journal
from dispynb.protocol import serialize
from dispynb.protocol.messages import (
    FINISHED,
    ComputationClosed,
    JobResults,
    Recover,
    Recovered,
)
from dispynb.secret import resolve_secret
from dispynb.status import status_of
from dispynb.transport.addressing import parse_address
from dispynb.transport.connector import connect
from dispynb.transport.tls import client_context

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
) -> list[DispyJob]:
    """Recover the jobs of a client that crashed (dispy's function).

    Parameters
    ----------
    recover_file:
        The ``recover_file`` the crashed `JobCluster` was given.
    timeout:
        Seconds to wait for jobs still running on the nodes; None waits until they
        end. Jobs still running then are returned with status ``Running``.
    terminate_pending:
        Accepted for dispy compatibility; running jobs are always let finish.
    secret, secret_file, certfile, keyfile, cafile:
        As for `JobCluster` (the journal never holds the secret; by default it comes
        from ``DISPYNB_SECRET`` or ``DISPYNB_SECRET_FILE``).

    Returns
    -------
    list of DispyJob
        Every job of the journal, in submission order, each exactly once, with its
        ``id``, arguments (``job._args``, ``job._kwargs``) and final status, result,
        output and traceback where known. A job that was never sent to a node ends
        ``Abandoned``.
    """
    if recover_file is None or not os.path.exists(recover_file):
        raise ConfigurationError(f"recover_file {recover_file!r} does not exist")
    key = resolve_secret(secret, secret_file)
    tls = client_context(certfile, keyfile, cafile) if (certfile or cafile) else None
    journal = Journal(recover_file)
    try:
        jobs: list[DispyJob] = []
        for recovery_id, _name, _nodes in journal.computations():
            recorded = journal.jobs(recovery_id)
            waiting: dict[str, dict[int, DispyJob]] = {}
            for job_key, job, node in recorded:
                jobs.append(job)
                if job.done():
                    continue
                if node is None:
                    job._complete(
                        JobStatus.Abandoned,
                        exception="not yet sent to a node when the client stopped",
                    )
                    journal.done(recovery_id, job_key, job)
                else:
                    waiting.setdefault(node, {})[job_key] = job
            for node, pending in waiting.items():
                asyncio.run(
                    _recover_from(node, recovery_id, pending, key, tls, timeout)
                )
                for job_key, job in pending.items():
                    if job.done():
                        journal.done(recovery_id, job_key, job)
        return jobs
    finally:
        journal.close()


async def _recover_from(
    node: str,
    recovery_id: str,
    pending: dict[int, DispyJob],
    secret: bytes | None,
    tls: ssl.SSLContext | None,
    timeout: float | None,
) -> None:
    host, port = parse_address(node)
    try:
        conn, _welcome = await connect(
            host, port, secret=secret, max_message_size=1 << 30, ssl_context=tls
        )
    except DispynbError as exc:
        logger.warning("cannot recover jobs from %s: %s", node, exc)
        _abandon(pending, f"node {node} could not be reached to recover the job: {exc}")
        return
    try:
        conn.write(Recover(comp_id=1, recovery_id=recovery_id))
        async with asyncio.timeout(timeout):
            while any(not job.done() for job in pending.values()):
                message, buffers = await conn.recv()
                if isinstance(message, JobResults):
                    _apply(message, buffers, pending, host)
                elif isinstance(message, Recovered) and not message.found:
                    _abandon(pending, f"node {node} no longer has the computation")
                elif (
                    isinstance(message, Recovered) and not message.running
                ) or isinstance(message, ComputationClosed):
                    _abandon(
                        pending, f"the job never reached node {node}: it did not run"
                    )
    except TimeoutError:
        logger.info("jobs still running on %s after %s s", node, timeout)
    except DispynbError as exc:
        _abandon(pending, f"lost node {node} while recovering: {exc}")
    finally:
        conn.close()


def _apply(
    message: JobResults,
    buffers: list[memoryview],
    pending: dict[int, DispyJob],
    ip: str,
) -> None:
    offset = 0
    for entry in message.results:
        key, _attempt, outcome, start, end, stdout, stderr, exception, count = entry
        result_buffers = buffers[offset : offset + count]
        offset += count
        job = pending.get(key)
        if job is None or job.done():
            continue  # delivered twice (before the crash, and now): once is enough
        result: Any = None
        if outcome == FINISHED:
            try:
                result = serialize.loads(result_buffers)
            except SerializationError as exc:
                outcome, exception = "crashed", f"the result cannot be unpickled: {exc}"
        job._complete(
            status_of(outcome),
            result=result,
            stdout=stdout,
            stderr=stderr,
            exception=exception,
            start_time=start or None,
            end_time=end or None,
            ip_addr=ip,
        )


def _abandon(pending: dict[int, DispyJob], reason: str) -> None:
    for job in pending.values():
        if not job.done():
            job._complete(JobStatus.Abandoned, exception=reason)
