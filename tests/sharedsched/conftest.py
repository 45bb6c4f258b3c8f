"""Fixtures: local node servers shared by a real scheduler process, and its users."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import LocalCluster
from tests.sharedsched.harness import SchedulerProcess, add_user


@pytest.fixture
def nodes() -> Iterator[LocalCluster]:
    """Two local node servers with 2 CPUs each."""
    with LocalCluster(nodes=2, cpus=2) as local:
        yield local


#: The users of the `users` fixture.
USERS = ("alice", "bob")


@pytest.fixture(scope="session")
def issued_users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the users file and credentials of `USERS`, issued once per
    session by ``dispynb-scheduler user add`` (a process each, under a second)."""
    directory = tmp_path_factory.mktemp("issued-users")
    for name in USERS:
        add_user(directory, name)
    return directory


@pytest.fixture
def users(tmp_path: Path, issued_users: Path) -> dict[str, Path]:
    """Users alice and bob: their credential files, and the users file in
    ``tmp_path``: copies (mode 0600 kept) of what ``user add`` issued for the
    session, so each test's scheduler has files of its own to revoke from."""
    shutil.copy2(issued_users / "users", tmp_path / "users")
    credentials = {}
    for name in USERS:
        path = tmp_path / f"{name}.credential"
        shutil.copy2(issued_users / path.name, path)
        credentials[name] = path
    return credentials


@pytest.fixture
def scheduler_args() -> tuple[str, ...]:
    """The options of the `scheduler` fixture's scheduler: a module that needs
    others (``--zombie_interval``...) overrides this fixture."""
    return ()


@pytest.fixture
def scheduler(
    tmp_path: Path,
    nodes: LocalCluster,
    users: dict[str, Path],
    scheduler_args: tuple[str, ...],
) -> Iterator[SchedulerProcess]:
    """A scheduler process owning ``nodes``, with options `scheduler_args`."""
    with SchedulerProcess.owning(tmp_path, nodes, *scheduler_args) as sched:
        yield sched
