"""Discovery on a machine whose only network is loopback (an offline laptop, a
container without network): a client with a secret finds the node on the same machine.

Each run is a private network namespace with only ``lo`` up (``unshare -n``), and a
PID namespace too, so that its node ends with it; nothing leaves the namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.nodeproc import node_env

#: Starts a node with a secret on every address (as `docs/howto/deploy-nodes.md`
#: says) and ``JobCluster(compute)`` naming no node, in the order given by argv[2],
#: and prints where the job ran.
PROGRAM = """
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dispynb
from tests.nodeproc import node_command

directory, order = Path(sys.argv[1]), sys.argv[2]
secret = os.environ["DISPYNB_SECRET"]


def start_node():
    port_file = directory / "port"
    log = open(directory / "node.log", "wb")
    proc = subprocess.Popen(
        node_command(
            "--port", "0", "--port-file", str(port_file), "--cpus", "1",
            "--name", "lo-node", "--dest-path", str(directory / "dest"),
        ),
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while not port_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "node did not start"
        time.sleep(0.01)
    return proc, int(port_file.read_text())


def compute(x):
    return x * 2


node = port = None
if order == "node-first":  # the client's ping finds it
    node, port = start_node()
cluster = dispynb.JobCluster(compute, secret=secret)
try:
    if order == "client-first":  # the node's announcement finds the client
        node, port = start_node()
    job = cluster.submit(21)
    finished = cluster.wait(timeout=15)
    print(json.dumps({
        "finished": finished, "result": job.result, "ip": job.ip_addr,
        "node_port": port, "nodes": [n.port for n in cluster.status().nodes],
    }))
finally:
    cluster.close(terminate=True)
    node.terminate()
    node.wait(20)
"""


def _unshare_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network and PID namespaces"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    return None


@pytest.mark.timeout(90)
@pytest.mark.parametrize("order", ["node-first", "client-first"])
def test_client_with_secret_finds_node_when_only_loopback_is_up(
    tmp_path: Path, order: str
) -> None:
    reason = _unshare_reason()
    if reason is not None:
        pytest.skip(reason)
    script = tmp_path / "client.py"
    script.write_text(PROGRAM)
    secret = secrets.token_urlsafe(32)
    # sh stays PID 1 (no exec): a node left by a failed run ends with the namespace.
    command = [
        "unshare", "-n", "-p", "-f", "--kill-child", "--mount-proc",
        "sh", "-c", 'ip link set lo up && "$@"; exit $?', "sh",
        sys.executable, str(script), str(tmp_path), order,
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=tmp_path,
        env={**node_env(), "DISPYNB_SECRET": secret},
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    log = (tmp_path / "node.log").read_text(errors="replace")
    assert done.returncode == 0, done.stdout + done.stderr + log
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["finished"], (summary, done.stderr, log)
    assert summary["result"] == 42
    assert summary["ip"] == "127.0.0.1"
    assert summary["nodes"] == [summary["node_port"]]


#: ``JobCluster`` naming nodes by a network this machine has no route to; prints
#: the warning the client logs when no node is found.
UNREACHABLE = """
import logging
import threading

import dispynb

said = []
warned = threading.Event()


class Catch(logging.Handler):
    def emit(self, record):
        said.append(record.getMessage())
        warned.set()


logging.getLogger("dispynb.backends.finder").addHandler(Catch(logging.WARNING))
cluster = dispynb.JobCluster(abs, nodes=["10.1.0.*"], secret="s" * 32)
try:
    assert warned.wait(30), "no warning within 30 s"
    print(said[0])
finally:
    cluster.close()
"""


@pytest.mark.timeout(60)
def test_a_ping_that_cannot_be_sent_is_named_with_the_fix(tmp_path: Path) -> None:
    """Nodes named by a network this machine has no route to (only loopback up):
    the ping fails with 'Network is unreachable', logged at debug only, and the
    warning 5 s later said "pinged 10.1.0.255 on UDP port 9712; no node answered",
    with causes (a firewall, --no-discovery...) that cannot be the reason."""
    reason = _unshare_reason()
    if reason is not None:
        pytest.skip(reason)
    command = [
        "unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
        sys.executable, "-c", UNREACHABLE,
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=tmp_path,
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    warning = done.stdout.strip()
    assert warning.startswith(
        "no node found in 5 s of discovery: could not send its ping to 10.1.0.255 "
        "(Network is unreachable) on UDP port 9712; still waiting"
    ), warning
    assert "The ping never left: this machine has no route to the nodes' network" in (
        warning
    )
    assert "Name the nodes: JobCluster(..., nodes=['host1', 'host2'])" in warning
    assert "pinged 10.1.0.255" not in warning and "firewall" not in warning
