"""``dispynb-node --exit-without-client``: a launched node whose client is gone ends
by itself (what `SlurmNodes` relies on when its client is killed), and a connected
client, however idle, keeps it, as does the open launcher of a live client."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodeproc import NODE_WAIT, CliNode, node_command, node_env, start_node

pytestmark = pytest.mark.slow

SECRET = "orphan-exit-test-secret-0123456789"
#: The nodes' --exit-without-client, seconds.
ALONE = 2.0
#: Seconds a node gets to notice and exit, well over ALONE on a loaded machine.
EXIT_WAIT = 40.0
STOPPED = "(--exit-without-client)"


class Client:
    """The client process (`tests.deploy.orphan_client`), read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.deploy.orphan_client", SECRET, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=node_env(),
            text=True,
        )

    def expect(self, word: str) -> list[str]:
        """The next line's fields; it must start with ``word`` (bounded by the
        test's timeout: a client that dies gives an empty line)."""
        assert self.proc.stdout is not None
        fields = self.proc.stdout.readline().split()
        assert fields[:1] == [word], f"client said {fields!r}, expected {word}"
        return fields

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def client_and_node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[
    tuple[Client, CliNode]
]:  # fmt: skip
    """A client in ``request.param``'s mode and the node it launched (registered)."""
    client = Client(*request.param)
    node: CliNode | None = None
    try:
        _, name, register_to = client.expect("LAUNCH")
        node = start_node(
            tmp_path, "--register", register_to, "--exit-without-client", f"{ALONE}",
            secret=SECRET, name=name,
        )  # fmt: skip
        yield client, node
    finally:
        client.end()
        if node is not None and node.proc.poll() is None:
            node.stop(signal.SIGKILL)


def _exit_status(node: CliNode) -> int:
    try:
        return node.proc.wait(EXIT_WAIT)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"node still running {EXIT_WAIT} s after its client left:\n"
            f"{node.log_text()}"
        ) from None


@pytest.mark.parametrize("client_and_node", [("kill",)], indirect=True)
def test_node_exits_when_its_client_is_killed(
    client_and_node: tuple[Client, CliNode],
) -> None:
    client, node = client_and_node
    client.expect("READY")  # the cluster ran a job on the node
    assert node.proc.poll() is None
    client.proc.send_signal(signal.SIGKILL)  # no close(), nothing cancelled
    client.proc.wait()
    assert _exit_status(node) == 0, node.log_text()
    log = node.log_text()
    assert STOPPED in log and "shutting down" in log


@pytest.mark.parametrize(
    "client_and_node", [("no-cluster", f"{3 * ALONE}")], indirect=True
)
def test_an_unused_node_stays_while_its_launcher_lives(
    client_and_node: tuple[Client, CliNode],
) -> None:
    client, node = client_and_node
    client.expect("READY")  # registered; no cluster connects
    # Three times the node's limit later: it is still there, having checked
    # (registering again) that its client lives, which the launcher did not take
    # for a new node.
    assert client.expect("WAITED")[1:] == ["1"]
    assert node.proc.poll() is None, node.log_text()
    assert node.log_text().count("registered with the client") >= 2
    client.proc.send_signal(signal.SIGKILL)
    client.proc.wait()
    assert _exit_status(node) == 0, node.log_text()
    assert STOPPED in node.log_text()


@pytest.mark.parametrize("client_and_node", [("idle", f"{3 * ALONE}")], indirect=True)
def test_connected_idle_client_keeps_the_node_until_it_closes(
    client_and_node: tuple[Client, CliNode],
) -> None:
    client, node = client_and_node
    # Idle (but connected, pulsing) for three times the node's limit, then a job
    # runs on the same node: it stayed.
    client.expect("AFTER-IDLE")
    assert node.proc.poll() is None
    client.expect("CLUSTER-CLOSED")  # no cluster, but the launcher is open
    assert node.proc.poll() is None
    assert STOPPED not in node.log_text()
    client.expect("CLOSED")  # the launcher closed without stopping the node
    assert _exit_status(node) == 0, node.log_text()
    assert STOPPED in node.log_text()


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_bad_value_is_refused_with_what_to_give(value: str) -> None:
    done = subprocess.run(
        node_command("--port", "0", "--exit-without-client", value),
        env=node_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=NODE_WAIT,
    )
    assert done.returncode == 2
    assert "--exit-without-client must be 0 (never) or a positive" in done.stderr


def test_a_node_without_register_counts_from_its_start(tmp_path: Path) -> None:
    node = start_node(tmp_path, "--exit-without-client", f"{ALONE}", secret=SECRET)
    try:
        assert _exit_status(node) == 0, node.log_text()
        assert STOPPED in node.log_text()
    finally:
        if node.proc.poll() is None:
            node.stop(signal.SIGKILL)
