"""A job fills the file system of its node's directory (``--dest-path``).

Every computation's directory, the node's file store (``.store``) and its result
spool (``.kept``) share that file system: a job of one client that writes until
ENOSPC leaves the others none. The node runs in a mount namespace of its own whose
``--dest-path`` is a 4 MiB tmpfs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from dispynb.errors import SetupError
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow

#: Bytes of the victim's file and of each of its results.
FILE = 200_000
RESULT = 2 << 20


def fill_the_disk() -> tuple[int, str]:
    """Write a file in the job's directory until the disk is full; keep it."""
    written, error = 0, ""
    handle = open("fill.bin", "wb", buffering=0)  # noqa: SIM115 (kept open)
    try:
        while True:
            written += handle.write(b"x" * 65536)
    except OSError as exc:
        error = exc.strerror or str(exc)
    return written, error


def uses_its_file(n: int) -> tuple[int, int]:
    print(f"job {n} prints", "x" * 100)
    return n * n, os.path.getsize("data.bin")


def large(n: int) -> bytes:
    return bytes([n]) * RESULT


@pytest.mark.attack(
    id="node-disk-full",
    title="A job fills the file system of its node's directory (a 4 MiB tmpfs) and "
    "keeps it full while another client sets up and runs jobs",
    goal="the node serves on: the other client's jobs run (output, 2 MiB results), "
    "its file refused with a SetupError naming the node's store and the error; "
    "accepted once the job's computation closed",
)
@pytest.mark.timeout(120)
def test_a_job_filling_its_nodes_disk_leaves_the_others_served(
    tmp_path: Path, measure
) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a tmpfs in a mount namespace needs root and unshare")
    dest = tmp_path / "node" / "dest"
    dest.mkdir(parents=True)
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(FILE))
    mount = f'mount -t tmpfs -o size=4m tmpfs "{dest}" && exec "$@"'
    launcher = ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh"]
    with running_node(tmp_path / "node", launcher=launcher, cpus=2) as node:
        mallory = JobCluster(fill_the_disk, nodes=[node.spec], secret=node.secret)
        try:
            filler = mallory.submit()
            written, error = filler()
            assert filler.status == DispyJob.Finished, filler.exception
            assert error, "the disk never filled"
            refusal = ""
            try:
                with JobCluster(
                    uses_its_file,
                    nodes=[node.spec],
                    secret=node.secret,
                    depends=[str(data)],
                ) as alice:
                    alice.submit(0)()
            except SetupError as exc:
                refusal = str(exc)
            with JobCluster(large, nodes=[node.spec], secret=node.secret) as alice:
                jobs = [alice.submit(n) for n in range(4)]
                results = [job() for job in jobs]
            with JobCluster(
                uses_its_file, nodes=[node.spec], secret=node.secret
            ) as alice:
                printing = [alice.submit(n) for n in range(3)]
                outputs = [(job(), job.stdout) for job in printing]
        finally:
            mallory.close()
        with JobCluster(
            uses_its_file, nodes=[node.spec], secret=node.secret, depends=[str(data)]
        ) as alice:
            after = alice.submit(3)
            afterwards = after()
        alive = node.proc.poll() is None
    right = sum(r == bytes([n]) * RESULT for n, r in enumerate(results))
    printed = sum(
        f"job {n} prints" in (out or "") for n, (_, out) in enumerate(outputs)
    )
    measure(
        f"the job wrote {written >> 10} KiB ({error}); the other client: file "
        f"refused (...{refusal.replace(str(dest), 'DEST')[-70:]}), {right}/4 results "
        "of 2 MiB right, "
        f"{printed}/3 outputs; after the close: {afterwards}; node alive: {alive}"
    )
    assert "No space left" in refusal and str(dest / ".store") in refusal
    assert right == 4 and printed == 3
    assert afterwards == (9, FILE)
    assert alive
