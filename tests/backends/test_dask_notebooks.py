"""The example notebooks under nbval on the Dask engine (issue 14 item 4).

The parameter is ``DISPYNB_LOCAL_ENGINE=dask``: the notebooks' ``%dispy local``
then starts a Dask ``LocalCluster`` and every ``%%dispy`` runs through the Dask
engine, the notebooks unchanged. nbval runs in a namespace host made by the test, so
the kernel, the Dask scheduler and its workers talk over that host's loopback only.
Notebooks that use what Dask cannot do (``--on NODE``, ``dispy_send_file``, program
files) are not in the list.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.netns import Network, unavailable_reason
from tests.nodeproc import ROOT, node_env

pytestmark = [
    pytest.mark.multihost,
    pytest.mark.slow,
    pytest.mark.notebook,
    pytest.mark.timeout(300),
]

pytest.importorskip("distributed")
pytest.importorskip("nbval")

#: The notebooks that run on Dask as they are.
ON_DASK = ["02-magics.ipynb", "06-provisional-and-cancel.ipynb"]


@pytest.fixture(scope="module")
def net() -> Iterator[Network]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Network(1).running() as network:
        yield network


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
    done = subprocess.run(
        net.hosts[0].command(argv),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
