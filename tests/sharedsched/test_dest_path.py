"""dest_path through a shared scheduler: a node keeps it under its client's address
(the scheduler's), shared by that client's computations as in dispy, so the
scheduler gives each user a dest_path of their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import JobCluster, LocalCluster, SharedJobCluster
from dispynb.errors import ConfigurationError
from tests.jobs import WAIT
from tests.sharedsched.harness import SchedulerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def leave(name: str) -> list[str]:
    import os

    with open(name, "w") as handle:
        handle.write(name)
    return sorted(os.listdir("."))


def look(_: int) -> list[str]:
    import os

    return sorted(os.listdir("."))


def test_a_users_dest_path_files_are_found_by_that_user_only(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """alice leaves a file in dest_path 'data' (cleanup=False): her next cluster
    finds it there, bob's cluster given the same dest_path does not (nor does its
    close, cleanup=True, remove it). One node: each job runs where the file is."""
    with SchedulerProcess(tmp_path, nodes.node_specs()[:1], nodes.secret) as sched:

        def cluster(function: object, user: str, **options: object) -> SharedJobCluster:
            return SharedJobCluster(
                function,
                scheduler_host=sched.address,
                secret_file=str(users[user]),
                dest_path="data",
                **options,
            )

        with cluster(leave, "alice", cleanup=False) as first:
            job = first.submit("alice.txt")
            assert job.finish.wait(WAIT) and job.result == ["alice.txt"], job.exception
        with cluster(look, "bob") as other:
            job = other.submit(0)
            assert job.finish.wait(WAIT) and job.result == [], job.exception
        with cluster(look, "alice") as again:
            job = again.submit(0)
            assert job.finish.wait(WAIT) and job.result == ["alice.txt"], job.exception


def where(_: int) -> str:
    import os

    return os.getcwd()


def test_a_dest_path_of_32_directories_works_as_with_jobcluster(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """The scheduler puts a user's dest_path under a directory of that user's: 32
    directories, the most a JobCluster may name, work through it too (the node saw
    33 and refused them), and 33 are refused by the client, as by JobCluster."""
    deep = "/".join(f"d{i}" for i in range(32))
    with JobCluster(where, nodes=nodes, dest_path=deep) as direct:
        assert direct.submit(0)().endswith(deep)
    with SchedulerProcess(tmp_path, nodes.node_specs()[:1], nodes.secret) as sched:
        with SharedJobCluster(
            where,
            scheduler_host=sched.address,
            secret_file=str(users["alice"]),
            dest_path=deep,
        ) as shared:
            job = shared.submit(0)
            assert job.finish.wait(WAIT) and job.result.endswith(f"alice/{deep}"), (
                job.exception
            )
        for cluster in (JobCluster, SharedJobCluster):
            with pytest.raises(ConfigurationError, match="names 33 directories"):
                cluster(where, nodes=nodes, dest_path=f"{deep}/d32")
