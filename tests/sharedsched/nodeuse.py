"""Jobs and views for the tests of how a cluster uses the nodes behind a shared
scheduler (``submit_node``, ``deallocate_node``, ``set_node_cpus``,
``close_node``): jobs that say which node ran them, the cluster's nodes by name."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

from dispynb import DispyJob, DispyNode, SharedJobCluster
from tests.jobs import wait_until


def where(seconds: float) -> str:
    """Sleep, then say which node ran the job."""
    import time

    time.sleep(seconds)
    return dispy_node_name  # type: ignore[name-defined]  # noqa: F821


def held(n: int, marks: str, release: str) -> str:
    """Write ``marks/n`` once running, wait for the file ``release`` (30 s at
    most), then say which node ran the job."""
    import os
    import time

    with open(os.path.join(marks, f".{n}"), "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(os.path.join(marks, f".{n}"), os.path.join(marks, str(n)))
    deadline = time.monotonic() + 30
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return dispy_node_name  # type: ignore[name-defined]  # noqa: F821


def by_name(cluster: SharedJobCluster) -> dict[str, DispyNode]:
    """The cluster's nodes by name."""
    return {node.name: node for node in cluster.status().nodes}


def overlapped(jobs: Sequence[DispyJob]) -> bool:
    """Whether two of ``jobs`` (ended) ran at the same time, by their node's
    clock."""
    spans = sorted((job.start_time, job.end_time) for job in jobs)
    return any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))


@contextlib.contextmanager
def alice_and_bob(
    address: str, users: dict[str, Path], nodes: list[str]
) -> Iterator[tuple[SharedJobCluster, SharedJobCluster]]:
    """Alice's and Bob's clusters of `where` at the scheduler ``address`` (their
    credentials in ``users``), once each lists the nodes named ``nodes``."""
    with (
        SharedJobCluster(
            where, scheduler_host=address, secret_file=str(users["alice"])
        ) as alice,
        SharedJobCluster(
            where, scheduler_host=address, secret_file=str(users["bob"])
        ) as bob,
    ):
        for cluster in (alice, bob):
            wait_until(lambda c=cluster: sorted(by_name(c)) == sorted(nodes))
        yield alice, bob
