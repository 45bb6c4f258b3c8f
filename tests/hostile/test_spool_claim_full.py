"""A node starts on a full disk while another node holds the shared kept-results
spool ``.kept``: it cannot make a spool of its own, and it used ``.kept``
unlocked, where it removed the other's results as it set a computation up and
offered them as its own when started again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

#: Inside a mount namespace, on a tmpfs of 64 inodes: another process (the other
#: node) holds .kept's flock, the inodes are used up, then this node claims.
SCRIPT = r"""
import fcntl, json, os, subprocess, sys
dest = sys.argv[1]
kept = os.path.join(dest, ".kept")
os.makedirs(kept)
open(os.path.join(dest, ".kept.lock"), "w").close()
other = subprocess.Popen(
    [sys.executable, "-c",
     "import fcntl, os, sys\n"
     "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
     "fcntl.flock(fd, fcntl.LOCK_EX)\n"
     "print('held', flush=True)\n"
     "sys.stdin.read()\n", kept],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
)
assert other.stdout.readline() == "held\n"
n = 0
try:
    while True:
        os.mkdir(os.path.join(dest, f"fill{n}"))
        n += 1
except OSError as exc:
    full = f"{exc.strerror} after {n} directories"
from nodeserver.spoolclaim import claim_spool
claim = claim_spool(dest, 0)
print(json.dumps([full, claim.root, claim.fd is not None]))
other.stdin.close()
other.wait()
"""


@pytest.mark.attack(
    id="spool-claim-full-disk",
    title="A node starts on a full disk (no inode left) beside a node holding the "
    "shared kept-results spool .kept",
    goal="no spool (its results kept in memory, logged), never another node's "
    "spool unlocked (was: .kept used without its lock)",
)
@pytest.mark.timeout(60)
def test_a_node_that_cannot_claim_does_not_take_a_held_spool(tmp_path: Path, measure):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a tmpfs in a mount namespace needs root and unshare")
    dest = tmp_path / "dest"
    dest.mkdir()
    mount = f'mount -t tmpfs -o size=1m,nr_inodes=64 tmpfs "{dest}" && exec "$@"'
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh",
         sys.executable, "-c", SCRIPT, str(dest)],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    full, root, locked = json.loads(done.stdout.splitlines()[-1])
    measure(f"disk: {full}; claimed: {root} (locked: {locked})")
    assert "No space left" in full
    assert root is None and not locked, (root, locked)
    assert "another node holds" in done.stderr and "in memory only" in done.stderr
