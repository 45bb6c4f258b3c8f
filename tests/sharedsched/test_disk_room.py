"""The files clients send leave room on the scheduler's disk: ``/tmp`` by default,
which the kept results of every user and the machine's other programs need too.

The scheduler runs in a mount namespace of its own whose ``--dest_path_prefix`` is
an 8 MiB tmpfs; a user's ``depends`` files would fill it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dispynb import LocalCluster, SharedJobCluster
from dispynb.errors import DispynbError
from tests.sharedsched.harness import WAIT, env_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

MiB = 1024 * 1024
DISK = 8 * MiB


def test_files_that_would_fill_the_disk_are_refused_before(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """Four files of 1.95 MiB fit on 8 MiB but would leave 0.2 MiB: the last is
    refused, the user is told why, and the room stays (it filled the disk)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a tmpfs in a mount namespace needs root and unshare")
    prefix = tmp_path / "spill"
    prefix.mkdir()
    port_file = tmp_path / "port"
    log = tmp_path / "scheduler.log"
    command = [
        "unshare", "-m", "--", "sh", "-c",
        f'mount -t tmpfs -o size={DISK} tmpfs "$0" && exec "$@"', str(prefix),
        sys.executable, "-m", "schedserver", "--users", str(tmp_path / "users"),
        "-i", "127.0.0.1", "-p", "0", "--port_file", str(port_file),
        "--dest_path_prefix", str(prefix),
    ]  # fmt: skip
    for node in nodes.node_specs():
        command += ["-n", node]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command,
            env=env_for(DISPYNB_SECRET=nodes.secret),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + WAIT
        while not port_file.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        address = f"127.0.0.1:{int(port_file.read_text())}"
        depends = []
        for index in range(4):
            path = tmp_path / f"data{index}.bin"
            path.write_bytes(os.urandom(int(1.95 * MiB)))
            depends.append(str(path))
        with pytest.raises(DispynbError) as raised:
            SharedJobCluster(
                len,
                scheduler_host=address,
                secret_file=str(users["alice"]),
                depends=depends,
            )
        message = str(raised.value)
        assert "refused: the scheduler keeps" in message, message
        assert "(--dest_path_prefix)" in message, message
        # The scheduler's tmpfs, as its own mount namespace sees it.
        stats = os.statvfs(f"/proc/{proc.pid}/root{prefix}")
        assert stats.f_blocks * stats.f_frsize == DISK
        assert stats.f_bavail * stats.f_frsize >= DISK // 20  # room_kept's share
    finally:
        proc.terminate()
        proc.wait(WAIT)
