"""Jobs with 10 MB arguments and results on a machine whose /dev/shm is too small.

Docker gives a container 64 MB of /dev/shm; a full tmpfs turns a write through a
mapping into SIGBUS, which kills the process instead of raising. The client
(`tests.hostile.shm_full_client`, with its LocalCluster's node and workers) runs in
a mount namespace of its own whose /dev/shm is a small tmpfs; the shell that started
it lists what is left there once it exited.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.nodeproc import ROOT, node_env

pytestmark = pytest.mark.slow

#: Printed by the shell after the client exited, then the names left in /dev/shm.
LEFT = "left in /dev/shm:"


def in_small_shm(mode: str, size: str) -> tuple[int, list[dict[str, object]], str, str]:
    """Run the client in ``mode`` with a /dev/shm of ``size``: its exit status, its
    jobs, its stderr and what it left in /dev/shm."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a tmpfs in a mount namespace needs root and unshare")
    script = (
        f"mount -t tmpfs -o size={size} tmpfs /dev/shm || exit 99; "
        '"$@"; status=$?; '
        f'echo "{LEFT}" $(ls -A /dev/shm); exit $status'
    )
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
         sys.executable, "-m", "tests.hostile.shm_full_client", mode],
        capture_output=True, text=True, cwd=ROOT, env=node_env(), timeout=120,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    left = [line for line in lines if line.startswith(LEFT)]
    assert left, (proc.returncode, proc.stdout, proc.stderr)
    jobs = json.loads(lines[-2]) if proc.returncode == 0 else []
    return proc.returncode, jobs, proc.stderr, left[-1][len(LEFT) :].strip()


def describe(status: int) -> str:
    if status > 128 and status - 128 in signal.valid_signals():
        return f"killed by {signal.Signals(status - 128).name}"
    return f"exit status {status}"


@pytest.mark.attack(
    id="shm-full",
    title="10 MB arguments and results while /dev/shm is 8 MiB, or filled by another "
    "file under a reused segment that grows, or half held by another program (13 MB "
    "jobs would leave it all but full)",
    goal="every job finishes over the socket, no process dies of SIGBUS (was: the "
    "client did), one warning naming /dev/shm and its fix, nothing left in /dev/shm; "
    "dispynb leaves an eighth of /dev/shm to other programs (was: it wrote to 3 MiB "
    "of the end), and a later job that fits still goes through it",
)
@pytest.mark.parametrize(
    ("mode", "size"), [("small", "8m"), ("filled", "16m"), ("neighbour", "32m")]
)
@pytest.mark.timeout(150)
def test_jobs_finish_when_dev_shm_cannot_hold_them(mode, size, measure):
    status, jobs, stderr, left = in_small_shm(mode, size)
    finished = sum(1 for job in jobs if job["finished"] and job["right"])
    warnings = stderr.count("shared memory")
    measure(
        f"{mode} ({size}): client {describe(status)}, {finished}/{len(jobs)} jobs "
        f"right, {warnings} warning(s), left: {left or 'nothing'}"
    )
    assert status == 0, (describe(status), stderr)
    assert jobs and finished == len(jobs), jobs
    assert left == ""
    # The results /dev/shm could not hold came over the connection, the others not.
    assert all((job["received"] >= job["result"]) == job["socket"] for job in jobs), (
        jobs
    )
    assert warnings == 1, stderr
    assert "/dev/shm" in stderr and "--shm-size" in stderr, stderr
