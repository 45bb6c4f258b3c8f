"""A node started without a secret (dispy's default): who may run code on it.

Anyone passes a handshake without a secret, so such a node must serve its own user
only: on loopback, never another user of the machine; never the network, even with
``--certfile`` (which proves the node to clients, not clients to the node).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from tests.hostile.tools import AS_NOBODY
from tests.nodeproc import NODE_WAIT, node_command, node_env
from tests.transport.certs import make_cert

pytestmark = pytest.mark.slow

CLIENT = """
import sys
import dispynb
from dispynb import DispyJob, JobCluster

def whoami():
    import os
    return os.geteuid()

try:
    with JobCluster(whoami, nodes=[sys.argv[1]]) as cluster:
        job = cluster.submit()
        job()
        print("ran as", job.result if job.status == DispyJob.Finished else job.status)
except dispynb.errors.DispynbError as exc:
    print("refused:", exc)
"""


def whoami() -> int:
    """The effective uid a job runs as."""
    import os

    return os.geteuid()


@contextlib.contextmanager
def node_without_secret(directory: Path, *args: str) -> Iterator[tuple[int, Path]]:
    """A real ``dispynb-node`` started without a secret: (port, log)."""
    directory.mkdir(parents=True, exist_ok=True)
    port_file, log = directory / "port", directory / "node.log"
    command = node_command(
        "--port", "0", "--port-file", str(port_file), "--cpus", "1",
        "--dest-path", str(directory / "dest"), "--no-discovery", *args,
    )  # fmt: skip
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            command, env=node_env(), stdout=handle, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + NODE_WAIT
        while not port_file.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "node did not listen"
            time.sleep(0.01)
        time.sleep(0.05)  # the port is written before it is read
        yield int(port_file.read_text()), log
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.timeout(120)
@pytest.mark.attack(
    id="no-secret-other-user",
    title="Another user of the machine (nobody) runs a job on a node that root started "
    "without a secret, on 127.0.0.1",
    goal="refused before the handshake, told to give both sides a secret; the node's "
    "own user's job runs (was: nobody's job ran as root)",
)
def test_another_user_cannot_run_code_on_a_node_without_a_secret(measure, tmp_path):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("a client of another user needs root and setpriv")
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    script.chmod(0o644)
    tmp_path.chmod(0o755)
    with node_without_secret(tmp_path / "node", "--host", "127.0.0.1") as (port, _):
        stranger = subprocess.run(
            [*AS_NOBODY, sys.executable, str(script), f"127.0.0.1:{port}"],
            env={**node_env(), "HOME": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        told = (stranger.stdout.strip() or stranger.stderr.strip()[-300:])[:200]
        with JobCluster(whoami, nodes=[f"127.0.0.1:{port}"]) as cluster:
            job = cluster.submit()
            own = job()
    measure(f"nobody: {told}; the node's user's job returned uid {own}")
    assert told.startswith("refused:"), told
    assert "no secret" in told and "secret" in told.split(";", 1)[1]
    assert job.status == DispyJob.Finished and own == 0


@pytest.mark.timeout(60)
@pytest.mark.attack(
    id="tls-without-client-auth",
    title="A node started on 0.0.0.0 with --certfile but neither a secret nor --cafile",
    goal="refused at start, naming --cafile and the secret (was: it served anyone "
    "on the network: a client without secret or certificate ran a job)",
)
def test_a_node_with_only_a_certificate_does_not_serve_the_network(measure, tmp_path):
    certfile, keyfile = make_cert(tmp_path, "node")
    command = node_command(
        "--host", "0.0.0.0", "--port", "0", "--no-discovery", "--cpus", "1",
        "--dest-path", str(tmp_path / "dest"),
        "--certfile", certfile, "--keyfile", keyfile,
    )  # fmt: skip
    proc = subprocess.Popen(
        command, env=node_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        output, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.terminate()
        output, _ = proc.communicate(timeout=15)
        code = None
    else:
        code = proc.returncode
    said = [line for line in output.decode().splitlines() if "refusing" in line]
    measure(f"exit status {code}: {said[0][:160] if said else 'served'}")
    assert code == 2, output.decode()[-2000:]
    assert "--cafile" in said[0] and "secret" in said[0]
