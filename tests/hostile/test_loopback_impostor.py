"""Another user of the machine listens on the loopback port of a node.

A node on loopback may keep a weak secret: its attackers are the machine's other
users, whose guesses it throttles, and it shows them nothing computed from the
secret. But a client proves the secret first, to whatever listens where it
connects, and on loopback any user can listen on a port that no node holds (not
started yet, restarted, stopped): the proof it gets is a verifier, against which a
dictionary is tried offline at the speed of HMAC.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from dispynb.errors import DispynbError
from dispynb.transport.connector import connect
from tests.hostile.tools import AS_NOBODY
from tests.nodeproc import ROOT, node_env, running_node

pytestmark = pytest.mark.slow

#: A small dictionary with the secret in the middle.
WORDS = [f"word{i:03d}" for i in range(100)] + ["dragon"] + [f"w{i}" for i in range(99)]

IMPOSTOR = """
import json, socket, sys
sys.path.insert(0, {root!r})
from dispynb.protocol import auth
from dispynb.protocol.handshake import CLIENT
from dispynb.protocol.messages import PROTOCOL_VERSION, Challenge
from tests.hostile.tools import recv_unsigned, send_unsigned

port, words = int(sys.argv[1]), json.loads(sys.argv[2])
server = socket.create_server(("127.0.0.1", port))
server.settimeout(20)
print("listening", flush=True)
got, cracked = [], None
conn, _ = server.accept()
conn.settimeout(5)
try:
    hello = recv_unsigned(conn)
    got.append(hello.op)
    nonce = auth.new_nonce()
    send_unsigned(conn, Challenge(version=PROTOCOL_VERSION, role="node", nonce=nonce))
    answer = recv_unsigned(conn)
    got.append(answer.op)
    for word in words:  # offline: as fast as HMAC goes
        guess = auth.proof(word.encode(), CLIENT, PROTOCOL_VERSION, hello.nonce, nonce)
        if auth.check_proof(guess, answer.proof):
            cracked = word
            break
except Exception as exc:
    got.append(type(exc).__name__)
print(json.dumps([got, cracked]), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _connect(port: int, secret: str) -> str:
    """What a client with ``secret`` meets connecting to 127.0.0.1:``port``."""
    try:
        conn, _ = await connect(
            "127.0.0.1", port, secret=secret.encode(), max_message_size=1 << 20
        )
    except DispynbError as exc:
        return f"{type(exc).__name__}: {exc}"
    conn.close()
    return "connected"


def square(n: int) -> int:
    return n * n


@pytest.mark.timeout(60)
@pytest.mark.attack(
    id="loopback-impostor",
    title="Another user of the machine (nobody) listens on a loopback node's port "
    "while the node is down, collects the proof of a client with a weak secret and "
    "tries a dictionary on it",
    goal="the client refuses before the handshake, saying another user listens "
    "there; a node of its own user on loopback still takes the weak secret (was: "
    "cracked offline, 'dragon' being word 101)",
)
def test_a_weak_secret_is_not_proved_to_another_users_port(measure, tmp_path: Path):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("a listener of another user needs root and setpriv")
    script = tmp_path / "impostor.py"
    script.write_text(IMPOSTOR.format(root=str(ROOT)))
    port = _free_port()
    impostor = subprocess.Popen(
        [*AS_NOBODY, sys.executable, str(script), str(port), json.dumps(WORDS)],
        env={**node_env(), "HOME": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert impostor.stdout is not None
        assert impostor.stdout.readline() == "listening\n", impostor.stderr
        met = asyncio.run(_connect(port, "dragon"))
        out, err = impostor.communicate(timeout=30)
    finally:
        if impostor.poll() is None:
            impostor.kill()
            impostor.wait()
    got, cracked = json.loads(out.splitlines()[-1]) if out.strip() else ([err], None)
    with (
        running_node(tmp_path / "node", secret="dragon") as node,
        JobCluster(square, nodes=[node.spec], secret="dragon") as cluster,
    ):
        job = cluster.submit(7)
        own = job()
        assert job.status == DispyJob.Finished, job.exception
    measure(
        f"client: {met[:110]}...; impostor got {got}, cracked: {cracked or 'no'}; "
        f"a node of the client's own user on loopback with the weak secret: {own}"
    )
    assert cracked is None and "auth" not in got
    assert met.startswith("AuthenticationError") and "another user" in met
    assert own == 49
