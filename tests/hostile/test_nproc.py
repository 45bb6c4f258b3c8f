"""A node whose user is at its process limit (``RLIMIT_NPROC``) because a job forks
until refused and holds its children.

A real ``dispynb-node`` run as ``nobody`` (root is never held to RLIMIT_NPROC) under
``prlimit --nproc``; it keeps ``CAP_DAC_OVERRIDE`` (ambient) to read the interpreter
and the checkout, which live under root's directories. Every wait is bounded.
"""

from __future__ import annotations

import os
import shutil

import pytest

from dispynb import DispyJob, JobCluster
from dispynb.errors import SetupError
from tests.hostile.tools import strong_secret
from tests.jobs import wait_for_path
from tests.nodeproc import start_node

pytestmark = pytest.mark.slow

NPROC = 30
AS_NOBODY = [
    "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
    "--inh-caps=+dac_override", "--ambient-caps=+dac_override",
    "prlimit", f"--nproc={NPROC}", "--",
]  # fmt: skip


def work(kind: str, marker: str, release: str) -> int:
    """``hog``: start processes until refused, mark, and take every slot that frees
    until ``release`` exists (then end them); else square the marker's length."""
    import os
    import subprocess
    import time

    if kind != "hog":
        return len(marker) ** 2
    held: list[subprocess.Popen[bytes]] = []
    refused = 0
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        try:
            held.append(subprocess.Popen(["sleep", "60"]))
        except OSError:  # the user's limit
            refused += 1
            if refused == 1:
                open(marker, "w").close()
            time.sleep(0.01)
    for proc in held:
        proc.kill()
        proc.wait()
    return len(held)


@pytest.mark.attack(
    id="node-nproc",
    title=f"A job starts processes until refused and holds every slot, on a node run "
    f"as nobody under prlimit --nproc={NPROC}; another cluster sets up meanwhile",
    goal="the job's fork fails, not the node; the new setup fails with a SetupError "
    "naming the process limit and what to do; it works once the job ends; no "
    "traceback (was: the node's process maker died of the failed fork, with a "
    "traceback, and computations started as new interpreters from then on)",
)
@pytest.mark.timeout(120)
def test_a_node_at_its_process_limit_says_so_and_serves_on(tmp_path, measure):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running a node as another user needs root and setpriv")
    # Sticky, as /tmp: a node refuses a --dest-path under one anyone may rename.
    os.chmod(tmp_path, 0o1777)
    marker, release = str(tmp_path / "hogging"), str(tmp_path / "release")
    # A strong secret: a client proves a weak one only to a port of its own user.
    node = start_node(
        tmp_path / "node", cpus=2, launcher=AS_NOBODY, secret=strong_secret()
    )
    try:
        with JobCluster(work, nodes=[node.spec], secret=node.secret) as cluster:
            hog = cluster.submit("hog", marker, release)
            wait_for_path(marker)
            squared = cluster.submit("sq", "abc", "")()  # its other worker serves
            try:
                with pytest.raises(SetupError) as refused:
                    JobCluster(work, nodes=[node.spec], secret=node.secret).close()
            finally:
                open(release, "w").close()
            held = hog()
        with JobCluster(work, nodes=[node.spec], secret=node.secret) as again:
            after = again.submit("sq", "abcd", "")()
    finally:
        node.stop()
    log = node.log_text()
    measure(
        f"the job held {held} processes; its computation's other job returned "
        f"{squared}; the new setup: {str(refused.value)[:150]}...; once the job "
        f"ended, a new cluster's job returned {after}"
    )
    assert 0 < held < NPROC and squared == 9
    assert "another process" in str(refused.value)
    assert "ulimit -u" in str(refused.value)
    assert after == 16 and hog.status == DispyJob.Finished
    assert "Traceback" not in log, log
    assert "zygote" not in log, log  # it serves on (was: gone, on the failed fork)
