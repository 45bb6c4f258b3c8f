"""Files are never written through symlinks (issue 13 item 8), end to end.

On the node, a job plants a symlink to an outside directory in its computation's
directory, then the client sends a file to ``name/a/b/x``; on the client, ``files_dir``
holds such a symlink and a job sends a file to ``name/a/b/x``. Nothing is created
outside: not the file, not a directory.
"""

from __future__ import annotations

import logging
import os

import pytest

from dispynb import JobCluster, LocalCluster

pytestmark = pytest.mark.slow


# --- run on nodes -------------------------------------------------------------


def plant_symlink(outside: str) -> str:
    os.symlink(outside, "name")
    return os.getcwd()


def send_nested_file() -> int:
    os.makedirs("name/a/b", exist_ok=True)
    with open("name/a/b/x", "w") as handle:
        handle.write("payload")
    return dispy_send_file("name/a/b/x")  # type: ignore[name-defined]  # noqa: F821


# --- tests ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def local():
    with LocalCluster(cpus=1) as cluster:
        yield cluster


def _tree(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.attack(
    id="node-dir-symlink",
    title="A job symlinks a name to an outside directory, then a file is sent to "
    "name/a/b/x",
    goal="the file is refused and nothing (no directory) is created outside",
)
def test_file_sent_through_a_job_planted_symlink(local, tmp_path, monkeypatch, measure):
    outside = tmp_path / "outside"
    outside.mkdir()
    client = tmp_path / "client"
    (client / "name" / "a" / "b").mkdir(parents=True)
    (client / "name" / "a" / "b" / "x").write_text("payload")
    monkeypatch.chdir(client)
    with JobCluster(plant_symlink, nodes=local) as cluster:
        job = cluster.submit(str(outside))
        assert job() is not None, job.exception
        refused = cluster.send_file("name/a/b/x", job.ip_addr)
    created = _tree(outside)
    measure(f"send_file returned {refused}; created outside: {created or 'nothing'}")
    assert refused == -1
    assert created == []


@pytest.mark.attack(
    id="client-dir-symlink",
    title="A node sends a file to name/a/b/x where files_dir/name is a symlink to "
    "an outside directory",
    goal="the file is refused and nothing (no directory) is created outside",
)
def test_file_received_through_a_symlink_in_files_dir(local, tmp_path, measure, caplog):
    outside = tmp_path / "outside"
    outside.mkdir()
    files_dir = tmp_path / "received"
    files_dir.mkdir()
    (files_dir / "name").symlink_to(outside)
    caplog.set_level(logging.WARNING)
    with JobCluster(send_nested_file, nodes=local, files_dir=str(files_dir)) as cluster:
        job = cluster.submit()
        sent = job()
    created = _tree(outside)
    measure(f"dispy_send_file returned {sent}; created outside: {created or 'nothing'}")
    assert sent == -1, job.exception  # the job learns that the client refused it
    assert created == []
    assert "symlink" in caplog.text and "symlink" in job.stderr
