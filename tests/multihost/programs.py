"""Client programs for the namespace hosts, and how to read what their jobs left.

Each job writes a marker file (``<n>_<node ip>_<run token>`` holding its start time) in
a directory all hosts see (namespaces share the file system), then sleeps (or waits for
the test's ``release`` file) and returns ``[n * n, marker name]``: so a test knows
every run of every job, and which run's result the client accepted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

FINISHED, ABANDONED = 11, 10

#: Shared by the client programs (``main(args)`` is added by each).
COMMON = """
import logging
import os
import sys
import time

import dispynb

logging.basicConfig(
    level=logging.INFO,
    stream=sys.stderr,
    format="%(created).3f %(name)s %(levelname)s %(message)s",
)


def compute(n, markers, seconds, release=None):
    name = f"{n}_{dispy_node_ip_addr}_{os.getpid()}.{os.urandom(4).hex()}"
    with open(os.path.join(markers, "." + name), "w") as handle:
        handle.write(repr(time.time()))
    os.rename(os.path.join(markers, "." + name), os.path.join(markers, name))
    if release is None:
        time.sleep(seconds)
        return [n * n, name]
    deadline = time.monotonic() + 60
    while not os.path.exists(release):  # the test's cue, not a duration
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.01)
    return [n * n, name]


def summary(jobs):
    out = []
    for job in jobs:
        result = job.result if isinstance(job.result, list) else [None, None]
        out.append(
            {
                "id": job.id,
                "status": int(job.status),
                "result": result[0],
                "run": result[1],
                "ip": job.ip_addr,
                "exception": None if job.exception is None else str(job.exception),
            }
        )
    return out


def submit_all(cluster, args):
    jobs = []
    for n in range(args["jobs"]):
        job = cluster.submit(n, args["markers"], args["seconds"], args.get("release"))
        job.id = n
        jobs.append(job)
    cluster.wait(timeout=args["timeout"])
    return summary(jobs)
"""

#: Runs ``args["jobs"]`` jobs on ``args["nodes"]`` with ``args["options"]``.
CLIENT = (
    COMMON
    + """

def main(args):
    cluster = dispynb.JobCluster(
        compute, nodes=args["nodes"], secret=args["secret"], **args.get("options", {})
    )
    try:
        return submit_all(cluster, args)
    finally:
        cluster.close(terminate=True)
"""
)

#: Like `CLIENT`, but first waits until ``args["before"]`` nodes are ready (found by
#: discovery), then writes the file ``args["ready"]`` if given.
WILDCARD_CLIENT = (
    COMMON
    + """

def main(args):
    cluster = dispynb.JobCluster(
        compute, nodes=args["nodes"], secret=args["secret"], **args.get("options", {})
    )
    try:
        deadline = time.monotonic() + 30
        while len(cluster.status().nodes) < args["before"]:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {cluster.status().nodes} ready")
            time.sleep(0.01)
        if "ready" in args:
            open(args["ready"], "w").close()
        return submit_all(cluster, args)
    finally:
        cluster.close(terminate=True)
"""
)


def job_args(
    nodes: list[str] | None, secret: str, markers: Path, jobs: int, seconds: float
) -> dict[str, object]:
    """Arguments of `CLIENT`."""
    markers.mkdir(exist_ok=True)
    return {
        "nodes": nodes,
        "secret": secret,
        "markers": str(markers),
        "jobs": jobs,
        "seconds": seconds,
        "timeout": 45,
    }


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a job, from its marker file."""

    name: str
    n: int
    ip: str
    started: float


def read_runs(markers: Path) -> dict[str, Run]:
    """Every run started so far, by marker name."""
    runs = {}
    for path in markers.iterdir():
        if path.name.startswith("."):
            continue  # being written
        n, ip, _token = path.name.split("_")
        runs[path.name] = Run(path.name, int(n), ip, float(path.read_text()))
    return runs


def started_on(markers: Path) -> dict[int, list[str]]:
    """Job number -> the node address of each of its runs, in order of their start."""
    out: dict[int, list[str]] = {}
    for run in sorted(read_runs(markers).values(), key=lambda r: r.started):
        out.setdefault(run.n, []).append(run.ip)
    return out
