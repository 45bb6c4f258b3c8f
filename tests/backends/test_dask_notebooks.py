"""The example notebooks under nbval on the Dask engine (issue 14 item 4).

The parameter is ``DISPYNB_LOCAL_ENGINE=dask``: the notebooks' ``%dispy local`` and
``LocalCluster(...)`` then start a Dask cluster on the machine
(`dispynb.backends._dasklocal`, workers named ``local-0``... like local nodes) and
every ``%%dispy``, ``Run.map`` and ``JobCluster(nodes=local)`` runs through the Dask
engine, the notebooks unchanged: ``--on local-1`` (Dask worker restrictions),
``dispy_send_file`` (files come back as events), program computations (run by the
job's runner on the worker). nbval runs in a namespace host made by the test, so
the kernel, the Dask scheduler and its workers talk over that host's loopback only.
While it runs, the test samples the processes under it: the jobs' runners on Dask
must show up, and no dispynb node server.

01-07 run here; 08-ssh-nodes and 09-slurm-nodes are about dispynb's own launchers
(``%dispy ssh`` / ``%dispy slurm`` start node servers over SSH or as batch jobs),
which Dask replaces with its own deployment; a multi-host Dask cluster in a notebook
(``%dispy dask tcp://HOST:8786``) is `test_dask_multihost_notebook`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.multihost.netns import Network
from tests.nodeproc import ROOT, node_env

pytestmark = [
    pytest.mark.multihost,
    pytest.mark.slow,
    pytest.mark.notebook,
    pytest.mark.timeout(300),
]

pytest.importorskip("distributed")
pytest.importorskip("nbval")

#: The notebooks that run on Dask as they are: all but the launchers' (08, 09).
ON_DASK = sorted(p.name for p in (ROOT / "notebooks").glob("0[1-7]-*.ipynb"))

#: Seconds nbval may take for one notebook.
NOTEBOOK_TIMEOUT = 280.0


def descendants(pid: int) -> list[str]:
    """The command lines of the processes under ``pid`` now."""
    lines = []
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                lines.append(" ".join(child.cmdline()))
    return lines


@pytest.mark.parametrize("notebook", ON_DASK)
def test_notebook_runs_on_the_dask_engine(
    net: Network, tmp_path: Path, notebook: str
) -> None:
    env = node_env()
    env["DISPYNB_LOCAL_ENGINE"] = "dask"
    argv = [
        sys.executable, "-m", "pytest", str(ROOT / "notebooks" / notebook),
        "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
    ]  # fmt: skip
    log = tmp_path / "nbval.log"
    seen: set[str] = set()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            net.hosts[0].command(argv),
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its kernel and Dask workers: one group
        )
    try:
        deadline = time.monotonic() + NOTEBOOK_TIMEOUT
        while proc.poll() is None:  # sample what runs under it
            assert time.monotonic() < deadline, log.read_text()[-6000:]
            seen.update(descendants(proc.pid))
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output[-8000:]
    assert " passed" in output and "failed" not in output
    assert any("dispynb.backends._daskhost" in line for line in seen), seen
    assert not [line for line in seen if "-m nodeserver" in line]
