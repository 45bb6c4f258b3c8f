"""``notebooks/08-ssh-nodes.ipynb`` under nbval, its kernel on namespace host h4 and
real ``sshd`` servers on h1-h3: the notebook a user runs, against SSH hosts.

The notebook is collected only with ``DISPYNB_SSH_HOSTS`` set (notebooks/conftest.py),
so the plain test run skips it and this test runs it where SSH hosts exist. With
``DISPYNB_SAVE_NOTEBOOK=1`` the executed notebook is written back (its outputs are
what the documentation site shows, as the site cannot run it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.multihost import sshd
from tests.multihost.launched import (
    host_python,
    node_pids,
    run_notebook,
    save_outputs,
)
from tests.multihost.netns import Host, Network
from tests.nodeproc import ROOT, node_env

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(300)]

NOTEBOOK = ROOT / "notebooks" / "08-ssh-nodes.ipynb"


def test_ssh_notebook_runs_under_nbval(
    network: Network,
    node_hosts: list[Host],
    client_host: Host,
    ssh3: sshd.SSHSetup,
    tmp_path: Path,
) -> None:
    python = host_python(tmp_path)
    env = node_env()
    env.update(
        DISPYNB_SSH_HOSTS=" ".join(h.ip for h in node_hosts),
        DISPYNB_SSH_PYTHON=str(python),
        DISPYNB_SSH_CONFIG=str(ssh3.config),
    )
    run_notebook(network, client_host, NOTEBOOK, env)
    for host in node_hosts:
        assert node_pids(host) == []
    if os.environ.get("DISPYNB_SAVE_NOTEBOOK"):
        save_outputs(network, client_host, NOTEBOOK, env)
