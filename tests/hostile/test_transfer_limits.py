"""File size and transfer quota on a node (issue 13 item 10), with its defaults."""

from __future__ import annotations

import pytest

from dispynb import JobCluster
from dispynb.errors import SetupError
from nodeserver.cli import build_parser
from nodeserver.config import DEFAULT_MAX_FILE_SIZE, DEFAULT_TRANSFER_QUOTA
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow

KiB = 1 << 10


def nothing() -> int:
    return 0


def test_defaults_are_limits_not_unlimited():
    args = build_parser().parse_args([])
    assert args.max_file_size == DEFAULT_MAX_FILE_SIZE == 512 << 20
    assert args.transfer_quota == DEFAULT_TRANSFER_QUOTA == 4 << 30


@pytest.mark.attack(
    id="transfer-quota",
    title="A computation sends file after file (each under --max-file-size) to a node",
    goal="refused past --transfer-quota, with a message naming it; other clients fine",
)
def test_files_past_the_transfer_quota_are_refused(
    tmp_path, monkeypatch, measure, caplog
):
    monkeypatch.chdir(tmp_path)
    for i in range(10):
        (tmp_path / f"f{i}.bin").write_bytes(bytes([i]) * (30 * KiB))
    with running_node(
        tmp_path / "node", "--max-file-size", "40k", "--transfer-quota", "100k"
    ) as node:
        with JobCluster(nothing, nodes=[node.spec], secret=node.secret) as cluster:
            target = cluster.status().nodes[0]
            sent = [cluster.send_file(f"f{i}.bin", target) for i in range(6)]
        # A new computation has its own quota; one whose files pass it cannot start.
        with JobCluster(nothing, nodes=[node.spec], secret=node.secret) as other:
            assert other.submit()() == 0
        with pytest.raises(SetupError, match="transfer quota of 102400 bytes") as info:
            JobCluster(
                nothing,
                nodes=[node.spec],
                secret=node.secret,
                depends=[f"f{i}.bin" for i in range(6, 10)],  # not on the node
            )
    accepted = sent.count(0)
    measure(f"{accepted} of 6 files of 30 KiB accepted under a 100 KiB quota")
    assert sent == [0, 0, 0, -1, -1, -1]
    assert "--transfer-quota" in str(info.value)


def size_of(name: str) -> int:
    import os

    return os.path.getsize(name)


def size_and_store(name: str, store: str) -> tuple[int, int]:
    """The job's file's size, and how many files the node's store holds now (not
    counting its own dot files)."""
    import os

    files = [entry for entry in os.listdir(store) if not entry.startswith(".")]
    return os.path.getsize(name), len(files)


def test_a_job_whose_file_passed_the_quota_says_so(tmp_path, monkeypatch):
    """A job whose own files (together) pass the quota fails with the node's
    reason (the quota and its option), not 'was not sent to this node'."""
    monkeypatch.chdir(tmp_path)
    names = [f"j{i}.bin" for i in range(4)]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(bytes([i]) * (30 * KiB))
    with (
        running_node(tmp_path / "node", "--transfer-quota", "100k") as node,
        JobCluster(size_of, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        refused = cluster.submit("j0.bin", dispy_job_depends=names)
        refused()
        fits = cluster.submit("j0.bin", dispy_job_depends=names[:1])
        assert fits() == 30 * KiB  # the refused job's files were let go
    assert refused.result is None
    assert "file 'j3.bin' was refused" in refused.exception, refused.exception
    assert "transfer quota of 102400 bytes" in refused.exception
    assert "--transfer-quota" in refused.exception


def test_a_long_computation_sends_jobs_own_files_past_the_quota(tmp_path, monkeypatch):
    """dispy's pattern: each job with its own data file (dispy_job_depends). The
    quota bounds the files a computation has on the node at once, not all it ever
    sent: a job's files are let go when it ends, so the node's store (with no
    cache) holds the running job's file only, and a file needed again is sent
    again. Jobs sharing one file at once all get it."""
    monkeypatch.chdir(tmp_path)
    names = [f"j{i}.bin" for i in range(8)]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(bytes([i]) * (30 * KiB))
    node_dir = tmp_path / "node"
    store = str(node_dir / "dest" / ".store")
    with (
        running_node(
            node_dir, "--transfer-quota", "100k", "--file-cache-size", "0", cpus=2
        ) as node,
        JobCluster(size_and_store, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        seen = []
        for name in [*names, names[0]]:
            job = cluster.submit(name, store, dispy_job_depends=[name])
            seen.append(job())
            assert job.exception is None, job.exception
        shared = [
            cluster.submit(names[1], store, dispy_job_depends=[names[1]])
            for _ in range(6)
        ]
        together = [job() for job in shared]
    assert seen == [(30 * KiB, 1)] * 9, seen
    assert [size for size, _count in together] == [30 * KiB] * 6
