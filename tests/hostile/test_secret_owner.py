"""Another user of the machine makes the secret file a node is given.

Mode 600 keeps other users from reading a secret file, not its owner. A node run
as root with ``--secret-file`` naming a file another user made (in ``/tmp``, or
left in their home) used the secret that user chose: they knew it, and their jobs
ran as root.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time

import pytest

from dispynb import JobCluster
from tests.hostile.tools import strong_secret
from tests.nodeproc import NODE_WAIT, node_command, node_env, write_secret_file

pytestmark = pytest.mark.slow


def _uid() -> int:
    import os

    return os.getuid()


@pytest.mark.attack(
    id="planted-secret-file",
    title="Another user of the machine makes (mode 600, a secret of theirs) the "
    "secret file a node running as root is given",
    goal="the node refuses to start, naming the file's owner (was: it served with "
    "that user's secret, and their job ran as root)",
)
@pytest.mark.timeout(60)
def test_a_secret_file_of_another_user_is_refused(tmp_path, measure) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: a node of root's and a file of another user's")
    secret = strong_secret()  # the other user's: they know it
    path = write_secret_file(tmp_path / "secret", secret)
    os.chown(path, pwd.getpwnam("nobody").pw_uid, -1)
    port_file = tmp_path / "port"
    command = node_command(
        "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
        "--secret-file", str(path), "--dest-path", str(tmp_path / "dest"),
    )  # fmt: skip
    proc = subprocess.Popen(
        command,
        env=node_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ran_as: int | None = None
    try:
        deadline = time.monotonic() + NODE_WAIT
        while not port_file.exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the node neither served nor ended"
            time.sleep(0.02)
        if port_file.exists():  # it serves: with the other user's secret
            node = f"127.0.0.1:{int(port_file.read_text())}"
            with JobCluster(_uid, nodes=[node], secret=secret) as cluster:
                ran_as = cluster.submit()()
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(NODE_WAIT)
    assert proc.stdout is not None
    said = proc.stdout.read()
    proc.stdout.close()
    refusal = next((line for line in said.splitlines() if "belongs to" in line), "")
    refusal = refusal.replace(str(path), "FILE")
    measure(
        f"node exit status {proc.returncode}; their job ran as uid {ran_as}; "
        f"said: {refusal[:160]!r}"
    )
    assert ran_as is None and proc.returncode == 2
    assert "'nobody'" in refusal and secret not in said
