"""The jobs' own files on their way from the scheduler to the nodes.

A node places a job's files (its ``depends``, `JobCluster.put`'s objects) as it
starts the job and never asks for them, so the scheduler writes each file a job
needs on the node's connection before the job, once per connection, as a client
connected to the node directly does; and it lets the node go of a job's own files
once no job sent there needs them (`FileRelease`). The client's files themselves
are kept by `schedserver.filerelay`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from dispynb.errors import DispynbError
from dispynb.objects import is_object_file
from dispynb.protocol.messages import FilePut, FileRelease
from schedserver.nodelimits import file_over_node

if TYPE_CHECKING:
    from schedserver.computation import QueuedJob, Upstream
    from schedserver.server import SchedulerServer

#: Bytes a job held at the scheduler counts besides its arguments (its objects),
#: against --max_user_args: many jobs of no arguments are bounded as a few large.
JOB_COST = 512

#: Bytes each file of a job's own (its entry's fourth item, ``[path, digest]``)
#: counts against --max_user_args besides its path and digest, while the job is
#: held here: a job listing 60,000 held 20 MiB, counted as `JOB_COST`.
OWN_FILE_COST = 256


def job_size(item: list[Any]) -> int:
    """What a job's entry counts against --max_user_args (its arguments apart):
    `JOB_COST`, and the files of its own it lists (entries checked already)."""
    if len(item) < 4:
        return JOB_COST
    return JOB_COST + sum(
        OWN_FILE_COST + len(entry[0]) + len(entry[1]) for entry in item[3]
    )


class _JobFiles:
    """`SharedComputation`'s part that relays its jobs' own files to its nodes."""

    server: SchedulerServer

    def _send_job_files(self, upstream: Upstream, jobs: list[QueuedJob]) -> None:
        """Write the files of ``jobs`` that ``upstream``'s node has not had on this
        connection, before the jobs. The client sent each to the scheduler once
        (`_FileRelay.file_put`); one no longer kept here, or over what the node
        takes (it would end the connection), fails its job on the node, saying the
        file never came."""
        sent = upstream.files_sent
        for job in jobs:
            item = job.item
            if len(item) < 4 or not item[3]:
                continue
            upstream.file_uses.need(own_files(item))
            for digest in _digests(item):
                if digest in sent:
                    continue
                data = self.server.files.get(digest)
                if data is None or file_over_node(
                    digest, data.nbytes, upstream.node.max_message_size
                ):
                    continue  # (the node would end the connection)
                sent.add(digest)
                self.server.write(
                    upstream, FilePut(digest=digest, size=data.nbytes), [data]
                )

    def _job_files_ended(self, upstream: Upstream, digests: list[str]) -> None:
        """Jobs that needed these files ended on ``upstream``'s node: let the node
        go of those no job sent there needs any more; they are sent again before a
        later job that needs them."""
        released = upstream.file_uses.done(digests)
        upstream.files_sent.difference_update(released)
        if released and upstream.conn is not None:
            with contextlib.suppress(DispynbError):  # its reader settles the node
                self.server.write(upstream, FileRelease(digests=released))


def own_files(item: list[Any]) -> list[str]:
    """The digests of a job's own files (a job-submit item's fourth part) that a
    node lets go when the job ends: not the objects put in the cluster (they stay
    for the cluster's life, sent once)."""
    return _digests(item, objects=False)


def _digests(item: list[Any], objects: bool = True) -> list[str]:
    """The digests of a job's files: each entry ``[relative_path, digest]``, with
    ``True`` after them for a program (`dispynb.scheduler.outbox.file_entry`); an
    entry of another shape is the node's to refuse."""
    if len(item) < 4 or not isinstance(item[3], list):
        return []
    return [
        entry[1]
        for entry in item[3]
        if isinstance(entry, list)
        and len(entry) in (2, 3)
        and isinstance(entry[0], str)
        and isinstance(entry[1], str)
        and (objects or not is_object_file(entry[0]))
    ]


__all__ = ["own_files"]
