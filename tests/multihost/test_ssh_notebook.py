"""``notebooks/08-ssh-nodes.ipynb`` under nbval, its kernel on namespace host h4 and
real ``sshd`` servers on h1-h3: the notebook a user runs, against SSH hosts.

The notebook is collected only with ``DISPYNB_SSH_HOSTS`` set (notebooks/conftest.py),
so the plain test run skips it and this test runs it where SSH hosts exist. With
``DISPYNB_SAVE_NOTEBOOK=1`` the executed notebook is written back (its outputs are
what the documentation site shows, as the site cannot run it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost import sshd
from tests.multihost.netns import Host, Network
from tests.multihost.test_ssh import node_pids
from tests.nodeproc import ROOT, node_env

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(300)]

NOTEBOOK = ROOT / "notebooks" / "08-ssh-nodes.ipynb"


@pytest.fixture
def ssh3(
    network: Network, node_hosts: list[Host], tmp_path: Path
) -> Iterator[sshd.SSHSetup]:
    reason = sshd.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with sshd.sshd_servers(network, node_hosts, tmp_path / "ssh") as setup:
        yield setup


def test_ssh_notebook_runs_under_nbval(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    ssh3: sshd.SSHSetup,
    tmp_path: Path,
) -> None:
    python = tmp_path / "python"  # the hosts' Python: this one, with the repo
    python.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = node_env()
    env.update(
        DISPYNB_SSH_HOSTS=" ".join(h.ip for h in node_hosts),
        DISPYNB_SSH_PYTHON=str(python),
        DISPYNB_SSH_CONFIG=str(ssh3.config),
    )
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    argv += ["--timeout", "240", str(NOTEBOOK)]
    proc = network.popen(
        client_host,
        argv,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=270)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    cells = sum(1 for c in NOTEBOOK.read_text().split('"cell_type": "code"')[1:])
    assert f"{cells} passed" in out, out
    for host in node_hosts:
        assert node_pids(network, host) == []
    if os.environ.get("DISPYNB_SAVE_NOTEBOOK"):
        save_outputs(network, client_host, env)


def save_outputs(network: Network, client_host: Host, env: dict[str, str]) -> None:
    """Execute the notebook once more with nbclient and store its outputs."""
    code = (
        "import nbformat, nbclient, sys\n"
        "nb = nbformat.read(sys.argv[1], as_version=4)\n"
        "nbclient.NotebookClient(nb, timeout=45, kernel_name='python3',"
        " resources={'metadata': {'path': sys.argv[2]}}).execute()\n"
        "nbformat.write(nb, sys.argv[1])\n"
    )
    done = subprocess.run(
        client_host.command(
            [sys.executable, "-c", code, str(NOTEBOOK), str(NOTEBOOK.parent)]
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=270,
        check=False,
    )
    assert done.returncode == 0, done.stderr
