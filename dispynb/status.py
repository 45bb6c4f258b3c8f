"""Cluster status for users: dispy's ClusterStatus, its status table, job outcomes."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from dispynb.job import JobStatus
from dispynb.node import DispyNode
from dispynb.protocol.messages import ABANDONED, CANCELLED, FINISHED

#: How a node's report of a job maps to dispy's statuses (others: Terminated).
_STATUS_OF_OUTCOME = {
    FINISHED: JobStatus.Finished,
    CANCELLED: JobStatus.Cancelled,
    ABANDONED: JobStatus.Abandoned,
}


class ComputationName(str):
    """A cluster's ``name``: the computation's name (a function's ``__name__``, a
    program's file name), a string, and callable as dispy's ``cluster.name()``
    method, which returns it."""

    __slots__ = ()

    def __call__(self) -> str:
        """The name, as dispy's ``JobCluster.name()``."""
        return str(self)


def status_of(outcome: str) -> JobStatus:
    """dispy's status for a job outcome a node reported."""
    return _STATUS_OF_OUTCOME.get(outcome, JobStatus.Terminated)


class ClusterStatus(NamedTuple):
    """What `JobCluster.status` returns (dispy's namedtuple)."""

    nodes: list[DispyNode]
    jobs_pending: int


@dataclasses.dataclass(frozen=True, slots=True)
class NodeWork:
    """One node's load, as `JobCluster.workload` reports it."""

    #: CPUs the cluster uses on the node (0 once it stopped sending it jobs).
    cpus: int
    #: Jobs sent to the node and not yet done (running, or waiting there for a CPU).
    jobs: int
    #: Jobs the node finished for the cluster so far.
    done: int


@dataclasses.dataclass(frozen=True, slots=True)
class Workload:
    """What a launcher's ``adapt`` reads from a cluster (`JobCluster.workload`)."""

    #: Jobs submitted and not yet sent to any node.
    waiting: int
    #: The nodes set up for the cluster, by ``'host:port'``.
    nodes: dict[str, NodeWork]


def format_status(
    nodes: list[DispyNode],
    wall_time: float,
    jobs_pending: int = 0,
    traffic: bool = True,
) -> str:
    """dispy's ``print_status`` text, in dispy's layout: a blank line, the heading
    and its rule, a row per node (its name, or its address if it has none, cut to 15
    characters; times to 0.1 s), a blank line, the jobs still pending (if any), the
    totals (to 1 ms) and a blank line. ``traffic``: the nodes' bytes sent and
    received are counted; if not (an engine that does not count them, as Ray), the
    Sent and Rcvd columns show "-" rather than a false 0 B."""
    heading = (
        f" {'Node':>15} | {'CPUs':>5} | {'Jobs':>7} | {'Sec/Job':>8} | "
        f"{'Node Time Sec':>13} | {'Sent':>7} | {'Rcvd':>7}"
    )
    lines = ["", heading, "-" * len(heading)]
    total_time = 0.0
    for node in nodes:
        name = node.name or node.ip_addr
        per_job = node.cpu_time / node.jobs_done if node.jobs_done > 0 else 0.0
        total_time += node.cpu_time
        sent = _byte_size(node.tx) if traffic else "-"
        received = _byte_size(node.rx) if traffic else "-"
        lines.append(
            f" {name:>15.15} | {node.cpus:>5} | {node.jobs_done:>7} | "
            f"{per_job:8.1f} | {node.cpu_time:13.1f} | {sent:>7} | {received:>7}"
        )
    speedup = total_time / wall_time if wall_time > 0 else 0.0
    lines.append("")
    if jobs_pending:
        lines.append(f"Jobs pending: {jobs_pending}")
    lines.append(
        f"Total job time: {total_time:.3f} sec, wall time: {wall_time:.3f} sec, "
        f"speedup: {speedup:.3f}"
    )
    lines.append("")
    return "\n".join(lines)


#: Units of `_byte_size`, largest first.
_UNITS = (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024))


def _byte_size(count: float) -> str:
    """A byte count as dispy's table shows it: "512 B", "1024 B", "1.5 K", "2.0 M"
    (a unit once the count is above it)."""
    for unit, size in _UNITS:
        if count > size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"
