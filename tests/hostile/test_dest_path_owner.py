"""Another user of the machine makes a node's directory before the node does.

A node keeps its files under ``--dest-path``, by default ``dispynb`` in the temporary
directory (``/tmp/dispynb``): a fixed name in a directory every user may write to.
Whoever makes it first owns it. The node made it "if missing" and used it as found,
so another user who made it (mode 777) could put files in it, or replace the node's
own subdirectories with theirs (the owner of a directory may rename anything in it):
the file store (``.store``) keeps files by the digest of their content and takes one
that is there already as that content, so a job got the other user's file instead of
its client's, and imported it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster, LocalCluster
from tests.nodeproc import running_node, start_node
from tests.sharedsched.harness import SchedulerProcess

pytestmark = pytest.mark.slow

#: Runs a command as nobody, with no capability (unlike tools.AS_NOBODY).
PLAIN_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]

#: The client's module, and what the other user plants under its digest.
MODULE = "VALUE = 'the client'\n"
PLANTED = "import os\nVALUE = f'planted by another user, run as uid {os.geteuid()}'\n"


def imports_its_module(n: int) -> str:
    import dnb_victim_module  # sent with the computation (depends=)

    return str(dnb_victim_module.VALUE)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory like /tmp (mode 1777) that another user can reach."""
    path = Path(tempfile.mkdtemp(prefix="dnb-shared-tmp-", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_nobody(script: str) -> None:
    subprocess.run([*PLAIN_NOBODY, "sh", "-ec", script], check=True, timeout=20)


#: One attack, two tests: the refusal, and the node's own directory still serving.
_SQUATTING = pytest.mark.attack(
    id="dest-path-squatting",
    title="Another user of the machine (nobody) makes a node's default directory "
    "(/tmp/dispynb) mode 777 before the node starts, and plants a module under the "
    "digest of one a client will send",
    goal="the node refuses that directory at start, naming its owner and the fix "
    "(was: the job imported the planted module, as the node's user)",
)


@_SQUATTING
@pytest.mark.timeout(60)
def test_a_directory_another_user_made_is_refused(
    tmp_path: Path, shared_tmp: Path, measure
) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("another user needs root and setpriv")
    dest = shared_tmp / "dispynb"
    digest = hashlib.sha256(MODULE.encode()).hexdigest()
    _as_nobody(
        f"mkdir -m 777 {dest} {dest}/.store\n"
        f"printf '%s' \"$1\" > {dest}/.store/{digest}\n".replace("$1", PLANTED)
    )
    module = tmp_path / "dnb_victim_module.py"
    module.write_text(MODULE)
    started = ""
    got = ""
    try:
        with running_node(tmp_path / "node", "--dest-path", str(dest)) as node:
            started = "started"
            with JobCluster(
                imports_its_module,
                nodes=[node.spec],
                secret=node.secret,
                depends=[str(module)],
            ) as cluster:
                job = cluster.submit(1)
                got = str(job())
                if job.status != DispyJob.Finished:
                    got = f"{job.status}: {job.exception}"
    except AssertionError as exc:  # start_node: the node exited
        started = str(exc).splitlines()[-1]
    measure(f"node: {started[:160]}; job got: {got or 'nothing (no node)'}")
    assert got != MODULE and "planted" not in got
    assert "nobody" in started and "dest" in started.lower()


@_SQUATTING
@pytest.mark.timeout(60)
def test_a_directory_of_the_nodes_own_user_still_serves(
    tmp_path: Path, shared_tmp: Path, measure
) -> None:
    dest = shared_tmp / "dispynb"
    module = tmp_path / "dnb_victim_module.py"
    module.write_text(MODULE)
    node = start_node(tmp_path / "node", "--dest-path", str(dest))
    try:
        with JobCluster(
            imports_its_module,
            nodes=[node.spec],
            secret=node.secret,
            depends=[str(module)],
        ) as cluster:
            job = cluster.submit(1)
            got = job()
    finally:
        node.stop()
    mode = dest.stat().st_mode & 0o777
    measure(f"a directory the node made itself: mode {mode:o}, the job got {got!r}")
    assert got == "the client" and mode == 0o700


@pytest.mark.attack(
    id="sched-dest-path-squatting",
    title="Another user of the machine (nobody) makes a scheduler's default spill "
    "directory (/tmp/dispynb/scheduler) mode 777 before the scheduler starts",
    goal="the scheduler refuses it at start, naming its owner and the fix (was: "
    "it started and spilled users' files and results there)",
)
@pytest.mark.timeout(60)
def test_a_spill_directory_another_user_made_is_refused(
    tmp_path: Path, shared_tmp: Path, measure
) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("another user needs root and setpriv")
    prefix = shared_tmp / "dispynb" / "scheduler"
    _as_nobody(f"mkdir -m 777 {prefix.parent} {prefix}")
    with LocalCluster(nodes=1, cpus=1) as nodes:
        sched = SchedulerProcess(
            tmp_path,
            nodes.node_specs(),
            nodes.secret,
            ("--dest_path_prefix", str(prefix)),
        )
        try:
            sched.start()
            met = "started"
        except AssertionError:  # it exited
            met = sched.log_text().strip().splitlines()[-1]
        finally:
            sched.stop()
    measure(f"scheduler: {met[:150]}")
    assert "nobody" in met and "--dest_path_prefix" in met
