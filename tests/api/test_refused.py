"""What a script's user sees when its cluster cannot use the node it names.

A real ``dispynb-node`` and a client script run as a user runs them; the error
must say what failed and how to fix it, without burying it under the client's
internal frames and chained errors.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.logged import logged_messages
from tests.nodeproc import (
    node_env,
    running_node,
    running_node_without_secret,
)
from tests.ports import PortHolder

pytestmark = pytest.mark.slow

SCRIPT = """
import sys
import dispynb as dispy

def double(x):
    return 2 * x

cluster = dispy.JobCluster(double, nodes=[sys.argv[1]], secret=sys.argv[2])
print(cluster.submit(3)())
"""


def run_script(
    tmp_path: Path, *args: str, code: str = SCRIPT
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as ``tmp_path``'s client.py with ``args`` (its node(s) and
    secret), as a user runs a script."""
    script = tmp_path / "client.py"
    script.write_text(code)
    return subprocess.run(
        [sys.executable, str(script), *args],
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def traceback_of(stderr: str) -> list[str]:
    """The lines of the traceback the script ended with."""
    lines = stderr.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("Traceback"))
    return lines[start:]


def assert_short(traceback: list[str]) -> None:
    frames = [line for line in traceback if line.lstrip().startswith('File "')]
    assert not any("dispynb/transport" in f or "asyncio" in f for f in frames), frames
    assert len(frames) <= 6, traceback
    assert not any("direct cause" in line for line in traceback), traceback


@pytest.mark.timeout(90)
def test_a_wrong_secret_stops_the_script_with_the_fix_on_its_last_line(
    tmp_path: Path,
) -> None:
    with running_node(tmp_path / "node", secret="the-nodes-secret-4f9c2a7e1b") as node:
        done = run_script(tmp_path, node.spec, "a-stale-secret-0d3e8b6a95")
    assert done.returncode == 1, done.stdout + done.stderr
    traceback = traceback_of(done.stderr)
    assert traceback[-1] == (
        f"dispynb.errors.AuthenticationError: {node.spec}: the client's proof is "
        "wrong: it uses another secret than this node; give this client the secret "
        "the node was started with (secret= or secret_file=, DISPYNB_SECRET or "
        "DISPYNB_SECRET_FILE)"
    )
    assert_short(traceback)
    assert "a-stale-secret" not in done.stderr
    # Said once: before, a "node ... cannot be used" warning said it too.
    assert done.stderr.count("another secret than this node") == 1, done.stderr


@pytest.mark.timeout(90)
def test_a_node_refusing_the_secret_beside_a_usable_one_is_warned_about_once(
    tmp_path: Path,
) -> None:
    """The script goes on with the node that takes its secret; the other is named
    in one warning (before: "node HOST:PORT cannot be used: HOST:PORT: ...")."""
    secret = "the-nodes-secret-4f9c2a7e1b"
    code = SCRIPT.replace("nodes=[sys.argv[1]]", "nodes=sys.argv[3:]")
    with (
        running_node(tmp_path / "good", secret=secret) as good,
        running_node(tmp_path / "other", secret="another-secret-9b2d71c4e8") as other,
    ):
        done = run_script(tmp_path, "", secret, good.spec, other.spec, code=code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "6"
    assert logged_messages(done.stderr) == [
        f"node {other.spec} cannot be used: the client's proof is wrong: it uses "
        "another secret than this node; give this client the secret the node was "
        "started with (secret= or secret_file=, DISPYNB_SECRET or DISPYNB_SECRET_FILE)"
    ]


@pytest.mark.timeout(90)
def test_a_stopped_node_is_said_to_be_maybe_stopped_not_maybe_no_node(
    tmp_path: Path,
) -> None:
    """A node whose process is stopped (Ctrl-Z, SIGSTOP, a suspended batch job)
    still completes TCP connections (the kernel does) but never answers: the
    script's last line says so (before, only 'is it a dispynb node?', which it is)."""
    secret = "the-nodes-secret-4f9c2a7e1b"
    with running_node(tmp_path / "node", secret=secret) as node:
        node.proc.send_signal(signal.SIGSTOP)
        try:
            done = run_script(tmp_path, node.spec, secret)
        finally:
            node.proc.send_signal(signal.SIGCONT)
    assert done.returncode == 1, done.stdout + done.stderr
    traceback = traceback_of(done.stderr)
    assert traceback[-1] == (
        f"dispynb.errors.ConnectTimeoutError: {node.spec} accepted the connection "
        "but did not complete the dispynb handshake in 5.0 s: the process there is "
        "stopped (SIGSTOP, Ctrl-Z, a suspended batch job), too busy to answer, or "
        "no dispynb-node (with TLS if the node uses TLS)"
    )
    assert_short(traceback)


@pytest.mark.timeout(90)
def test_no_node_listening_stops_the_script_with_a_short_traceback(
    tmp_path: Path, held_port: PortHolder
) -> None:
    spec = f"127.0.0.1:{held_port()}"  # nothing listens there
    done = run_script(tmp_path, spec, "the-nodes-secret-4f9c2a7e1b")
    assert done.returncode == 1, done.stdout + done.stderr
    traceback = traceback_of(done.stderr)
    assert traceback[-1].startswith(
        f"dispynb.errors.ConnectionClosedError: cannot connect to {spec}"
    )
    assert traceback[-1].endswith("is dispynb-node running there?")
    assert_short(traceback)


@pytest.mark.timeout(90)
def test_nodes_none_listening_say_each_reason_once_ending_with_the_fix(
    tmp_path: Path, held_port: PortHolder
) -> None:
    """Several named nodes, none listening: each one's reason is said once (before:
    the "no node could be used" line named every node, then the error raised
    repeated the first's, and a warning each said both again)."""
    specs = [f"127.0.0.1:{held_port()}", f"127.0.0.1:{held_port()}"]
    code = SCRIPT.replace("[sys.argv[1]]", "sys.argv[1].split(',')")
    done = run_script(tmp_path, ",".join(specs), "a-secret-9d2c", code=code)
    assert done.returncode == 1, done.stdout + done.stderr
    for spec in specs:
        assert done.stderr.count(f"cannot connect to {spec}") == 1, done.stderr
    assert "no node could be used" in done.stderr, done.stderr
    traceback = traceback_of(done.stderr)
    assert traceback[-1].endswith("is dispynb-node running there?"), traceback
    assert_short(traceback)


#: Run before the client script: answers a lookup of a name under ``.invalid`` (RFC
#: 6761: never resolves) as the resolver does, without asking DNS off the machine.
NO_DNS = """
import socket
_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    if str(host).endswith(".invalid"):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
"""


@pytest.mark.timeout(90)
def test_a_host_name_that_does_not_resolve_says_so_not_is_a_node_running(
    tmp_path: Path,
) -> None:
    """A typo'd host name is no node that is down: the message says the name does
    not resolve and how to fix it (before: "...; is dispynb-node running there?")."""
    secret = "the-nodes-secret-4f9c2a7e1b"
    done = run_script(tmp_path, "nodee1.invalid", secret, code=NO_DNS + SCRIPT)
    assert done.returncode == 1, done.stdout + done.stderr
    traceback = traceback_of(done.stderr)
    assert traceback[-1] == (
        "dispynb.errors.ConnectionClosedError: cannot connect to nodee1.invalid:9711: "
        "cannot resolve host name 'nodee1.invalid' (Name or service not known): "
        "check its spelling, or give its IP address"
    ), traceback[-1]
    assert_short(traceback)


SETUP_SCRIPT = """
import sys
import dispynb as dispy

def read_data():
    raise FileNotFoundError("data.csv")

def double(x):
    return 2 * x

cluster = dispy.JobCluster(
    double, nodes=[sys.argv[1]], secret=sys.argv[2], setup=read_data
)
"""


@pytest.mark.timeout(90)
def test_a_failing_setup_shows_its_own_traceback_not_the_clients_internals(
    tmp_path: Path,
) -> None:
    """The node's traceback of the user's setup is shown (its file, line and
    source, as a local traceback), not the I/O thread's frames and asyncio's."""
    script = tmp_path / "client.py"
    with running_node(tmp_path / "node", secret="the-nodes-secret-4f9c2a7e1b") as node:
        done = run_script(tmp_path, node.spec, node.secret, code=SETUP_SCRIPT)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    error = (
        f"dispynb.errors.SetupError: {node.spec}: setup raised FileNotFoundError: "
        "data.csv"
    )
    assert error in lines, done.stderr
    mine = lines.index(error)
    assert_short(lines[:mine])
    assert lines[mine + 1 :] == [
        "",
        "The node's traceback:",
        "Traceback (most recent call last):",
        f'  File "{script}", line 6, in read_data',
        '    raise FileNotFoundError("data.csv")',
        "FileNotFoundError: data.csv",
    ], done.stderr


@pytest.mark.timeout(90)
def test_a_module_missing_on_the_node_names_it_and_depends_in_a_short_traceback(
    tmp_path: Path,
) -> None:
    """A module beside the script, used by the computation, is not on the node:
    the message says which and how to send it, without the unpickler's frames."""
    (tmp_path / "mymodel.py").write_text("def scale(x):\n    return 3 * x\n")
    code = SCRIPT.replace("return 2 * x", "return mymodel.scale(x)").replace(
        "import dispynb as dispy", "import dispynb as dispy\nimport mymodel"
    )
    with running_node(tmp_path / "node", secret="the-nodes-secret-4f9c2a7e1b") as node:
        done = run_script(tmp_path, node.spec, node.secret, code=code)
    assert done.returncode == 1, done.stdout + done.stderr
    traceback = traceback_of(done.stderr)
    assert traceback[-2:] == [
        f"dispynb.errors.SetupError: {node.spec}: cannot load computation 'double' "
        "on the node: ModuleNotFoundError: No module named 'mymodel' (is a module "
        "it needs missing on the node? install it there, or send it with depends)",
        # the module's file and the fix, as a job's traceback ends (9c297e0)
        f"(this client imports 'mymodel' from {tmp_path / 'mymodel.py'}, the node "
        "cannot: send it with JobCluster(..., depends=[mymodel]), or install it on "
        "the node)",
    ], done.stderr
    assert_short(traceback)


@pytest.mark.timeout(90)
def test_a_client_without_a_secret_is_told_it_has_none(tmp_path: Path) -> None:
    """The first-hour mistake of a shell without DISPYNB_SECRET: the message says
    this client has no secret (it said first, in the node's words, that the client
    'uses another secret than this node', then that it has none)."""
    with running_node(tmp_path / "node", secret="the-nodes-secret-4f9c2a7e1b") as node:
        done = run_script(tmp_path, node.spec, "")
    assert done.returncode == 1, done.stdout + done.stderr
    traceback = traceback_of(done.stderr)
    assert traceback[-1] == (
        f"dispynb.errors.AuthenticationError: {node.spec}: the client's proof is "
        "wrong: this client has no secret, the node has; give it the secret the "
        "node was started with (secret= or secret_file=, DISPYNB_SECRET or "
        "DISPYNB_SECRET_FILE)"
    ), traceback[-1]
    assert_short(traceback)


@pytest.mark.timeout(90)
def test_a_client_with_a_secret_is_told_the_node_has_none(tmp_path: Path) -> None:
    """A node started without a secret (loopback, its own user only) and a client
    given one: the message says the node has none and the two ways to fix it."""
    with running_node_without_secret(tmp_path) as spec:
        done = run_script(tmp_path, spec, "the-clients-secret-4f9c2a7e1b")
    assert done.returncode == 1, done.stdout + done.stderr
    traceback = traceback_of(done.stderr)
    assert traceback[-1] == (
        f"dispynb.errors.AuthenticationError: {spec}: the client's proof is "
        "wrong: it uses a secret and this node has none; connect without a secret, "
        "or start the node with this one (DISPYNB_SECRET or --secret-file)"
    ), traceback[-1]
    assert_short(traceback)
    assert "the-clients-secret" not in done.stderr
