"""The node server at its descriptor limit: what it reports and what it admits
(`nodeserver.descriptors`, `nodeserver.monitor`), in a process whose limit is the
descriptors it has open."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.nodeproc import ROOT, node_env

AT_THE_LIMIT = """
import json, os, resource
from nodeserver import descriptors
from nodeserver.monitor import avail_info

open_now = len(os.listdir("/proc/self/fd")) - 1
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now, open_now))
try:
    open(os.devnull)
    opened = True
except OSError:
    opened = False
print(json.dumps({
    "opened": opened,
    "avail": avail_info("/"),
    "shortage": descriptors.shortage(2),
    "explained": descriptors.explain(OSError(24, "Too many open files"), "x"),
}))
"""


def test_a_node_with_no_descriptor_left_reports_and_refuses_without_raising():
    """Before, avail_info raised OSError (psutil opening /proc/stat): the node's
    pulses stopped (its clients declared it dead) and its Welcome failed."""
    done = subprocess.run(
        [sys.executable, "-c", AT_THE_LIMIT],
        capture_output=True, text=True, cwd=ROOT, env=node_env(), timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert not found["opened"]  # truly at the limit
    # Unknown, not 0: a node short of descriptors is not a full node (the disk's
    # figure needs no descriptor).
    cpu, memory, disk, swap = found["avail"]
    assert cpu is None and memory is None and swap is None
    assert disk > 0
    assert "short of file descriptors" in found["shortage"]
    assert "ulimit -n" in found["shortage"] and "ulimit -n" in found["explained"]
