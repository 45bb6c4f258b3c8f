"""`SSHNodes`' arguments and the command it runs remotely (no ssh started)."""

from __future__ import annotations

import shlex

import pytest

from dispynb.deploy import LaunchError, SSHNodes
from dispynb.errors import ConfigurationError


def test_remote_command_holds_no_secret_and_quotes_everything() -> None:
    nodes = SSHNodes(
        ["h1"],
        python="/opt/my venv/bin/python",
        env={"PYTHONPATH": "/a b;rm -rf /"},
        node_args=["--cpus", "2"],
        secret="top-secret-value-0123456789abcdef",
        start=False,
    )
    try:
        command = nodes.remote_command("ssh-0-abc", "10.0.0.1:4000")
        assert b"top-secret" not in command.encode()
        argv = shlex.split(command)
        assert argv[:2] == ["env", "PYTHONPATH=/a b;rm -rf /"]
        assert argv[2:4] == ["/opt/my venv/bin/python", "-c"]
        assert "'-P', '-m', 'nodeserver'" in argv[4].replace('"', "'")
        assert "--secret-stdin" in argv and argv[-2:] == ["--cpus", "2"]
        assert argv[argv.index("--register") + 1] == "10.0.0.1:4000"
        assert argv[argv.index("--parent-pipe") + 1] == "0"
    finally:
        nodes.close()


@pytest.mark.parametrize("hosts", [[], ["-oProxyCommand=x"], ["a b"], [""]])
def test_bad_hosts_are_refused(hosts: list[str]) -> None:
    with pytest.raises(ConfigurationError):
        SSHNodes(hosts, start=False)


def test_a_secret_with_a_newline_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="newline"):
        SSHNodes(["h1"], secret="two\nlines", start=False)


def test_new_nodes_go_to_the_hosts_running_fewest() -> None:
    """After a scale-down, `scale`/`adapt` place new nodes where fewest run (a host
    listed twice takes two)."""
    from types import SimpleNamespace

    from dispynb.deploy.base import Launched

    nodes = SSHNodes(["a", "a", "b"], start=False)
    try:
        alive = SimpleNamespace(returncode=None)
        for index, host in enumerate(["a", "b"]):
            handle = SimpleNamespace(host=host, proc=alive)
            nodes._launched.append(Launched(f"n{index}", handle))  # type: ignore[arg-type]
        # a runs 1 of its 2, b 1 of its 1: the next goes to a, then (2/2, 1/1) a.
        assert nodes._host_for(2) == "a"
        assert nodes._host_for(2) == "a"  # the same answer for the same node
        nodes._launched[0].stopped = True  # a's node was scaled down
        nodes._launched[1].draining = True  # b's is draining
        assert nodes._host_for(3) == "a"
        ended = SimpleNamespace(
            host="a", proc=SimpleNamespace(returncode=1), last_lines=[]
        )
        nodes._launched = [Launched("n9", ended)]  # type: ignore[list-item]
        assert nodes._host_for(4) == "a"  # an ended node runs nothing
    finally:
        nodes.close()


def test_without_ssh_the_error_says_so(tmp_path: object) -> None:
    """No ``ssh`` command: the error said only 'No such file or directory'."""
    with pytest.raises(LaunchError) as raised:
        SSHNodes(["h1"], ssh=f"{tmp_path}/ssh", wait=5)
    message = str(raised.value)
    assert f"cannot run '{tmp_path}/ssh': No such file or directory" in message
    assert "install the OpenSSH client, or give ssh= the command's path" in message
