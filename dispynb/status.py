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
    """dispy's ``print_status`` text: a row per node, the jobs still pending (if any)
    and the totals, between blank lines. ``traffic``: the nodes' bytes sent and
    received are counted; if not (an engine that does not count them, as Ray), the
    Sent and Rcvd columns show "-" rather than a false 0 B."""
    heading = (
        f"{'Node':>30s} | {'CPUs':>5s} | {'Jobs':>7s} | {'Sec/Job':>8s} | "
        f"{'Node Time Sec':>13s} | {'Sent':>9s} | {'Rcvd':>9s}"
    )
    lines = ["", heading, "-" * len(heading)]
    total_time = 0.0
    for node in nodes:
        name = f"{node.ip_addr} ({node.name})" if node.name else node.ip_addr
        per_job = node.cpu_time / node.jobs_done if node.jobs_done else 0.0
        total_time += node.cpu_time
        lines.append(
            f"{name[:30]:>30s} | {node.cpus:5d} | {node.jobs_done:7d} | "
            f"{per_job:8.3f} | {node.cpu_time:13.3f} | "
            f"{_human(node.tx) if traffic else '-':>9s} | "
            f"{_human(node.rx) if traffic else '-':>9s}"
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


def _human(count: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} T"
