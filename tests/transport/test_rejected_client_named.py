"""A node's log line for a client refused in the handshake names that client: its
address and port, and the name it gave (its host and script), so that an
administrator can tell who is misconfigured (a scheduler's: test_clients.py).
Before, the line named the source address alone ("rejected connections from
127.0.0.1: the client's proof is wrong: ..."): every user of a JupyterHub, every
script of a lab machine looked the same."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.jobs import wait_until
from tests.nodeproc import node_env, running_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SCRIPT = """
import sys
import dispynb as dispy

def double(x):
    return 2 * x

cluster = dispy.JobCluster(double, nodes=[sys.argv[1]], secret=sys.argv[2])
print(cluster.submit(3)())
"""


def test_a_node_names_the_client_whose_secret_it_rejected(tmp_path: Path) -> None:
    script = tmp_path / "train_model.py"
    script.write_text(SCRIPT)
    with running_node(tmp_path / "node", secret="the-nodes-secret-4f9c2a7e1b") as node:
        done = subprocess.run(
            [sys.executable, str(script), node.spec, "a-stale-secret-0d3e8b6a95"],
            env=node_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, done.stdout + done.stderr
        said = "the client's proof is wrong: it uses another secret than this node"
        wait_until(lambda: said in node.log_text())
        log = node.log_text()
    client = f"'{socket.gethostname()}:train_model.py'"
    line = re.search(
        r"rejected connections from 127\.0\.0\.1:(\d+) \(client (\S+)\): (.*)", log
    )
    assert line, log
    assert line[2] == client and line[3] == said, line[0]
    assert "a-stale-secret" not in log
