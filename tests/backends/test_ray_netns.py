"""The Ray engine's tests, run in a private network and PID namespace; and what needs
no Ray cluster: ``import dispynb`` loads no Ray."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.backends.conftest import IN_NETNS
from tests.nodeproc import inner_pytest

ROOT = Path(__file__).resolve().parents[2]


def _no_namespaces() -> str | None:
    """Why namespaces cannot be made here (None if they can)."""
    if os.geteuid() != 0:
        return "the Ray tests run in a private network namespace: run them as root"
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"the Ray tests need {tool} ({package})"
    return None


def _cannot_unshare() -> str | None:
    reason = _no_namespaces()
    if reason is not None:
        return reason
    try:
        import ray  # noqa: F401
    except ImportError:
        return (
            "ray is not installed: pip install ray (or '.[test]' in dispynb's checkout)"
        )
    return None


#: PID 1 of the private namespace: sh, running the command in the background. PID 1
#: gets no signal it has no handler for, and a shell runs no trap while a command
#: runs in the foreground: so it traps, and waits. On SIGTERM (CI's timeout signals
#: the test's process group), SIGINT or SIGHUP it exits, and the kernel kills every
#: process of the namespace with it: the command (the inner pytest outlives a SIGTERM:
#: Ray's handler raises SystemExit, one test's failure) and its orphans (Ray's
#: daemons, in sessions of their own).
NAMESPACE_INIT = (
    'ip link set lo up || exit; trap "exit 143" HUP INT TERM; "$@" & wait $!'
)


def in_private_namespace(*argv: str) -> list[str]:
    """The command running ``argv`` in new network (loopback only) and PID
    namespaces; it ends with all it started when its process group is signalled,
    or when the process that started it dies (``--pdeathsig``: the outer pytest
    killed alone)."""
    unshare = ["unshare", "-n", "-p", "-f", "--kill-child", "--mount-proc"]
    return [
        "setpriv",
        "--pdeathsig",
        "KILL",
        *unshare,
        "sh",
        "-c",
        NAMESPACE_INIT,
        "sh",
        *argv,
    ]


@pytest.mark.slow
@pytest.mark.multihost
@pytest.mark.timeout(1200)
def test_ray_in_private_network() -> None:
    """Run the Ray tests (tests/backends/test_ray*.py, conftest's `IN_NETNS`) where
    only loopback exists; they must pass."""
    reason = _cannot_unshare()
    if reason is not None:
        pytest.skip(reason)
    here = Path(__file__).parent.relative_to(ROOT)
    inner = inner_pytest(*(str(here / name) for name in IN_NETNS))
    proc = subprocess.run(
        in_private_namespace(*inner),
        env={**os.environ, "DISPYNB_IN_NETNS": "1", "RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=1150,
    )
    assert proc.returncode == 0, f"inner run failed:\n{proc.stdout}\n{proc.stderr}"
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout


#: A command that outlives SIGTERM, as the inner pytest does once Ray set its
#: handler, and starts a process in a session of its own, as Ray's daemons are.
STUBBORN = """
import signal, subprocess
signal.signal(signal.SIGTERM, lambda *_: print("SIGTERM shrugged off", flush=True))
subprocess.Popen(["setsid", "sleep", "600"])
print("started", flush=True)
while True:
    signal.pause()
"""


@pytest.mark.timeout(60)
def test_the_private_namespace_ends_with_all_it_started_on_sigterm() -> None:
    """SIGTERM to the process group of `in_private_namespace` (CI's timeout stops a
    run so) ends it and everything it started. Before, unshare blocked the signal,
    sh (PID 1 of the namespace, with no handler) never got it, the inner pytest
    shrugged it off, and they ran on with Ray's daemons after the run was over."""
    reason = _no_namespaces()
    if reason is not None:
        pytest.skip(reason)
    with subprocess.Popen(
        in_private_namespace(sys.executable, "-c", STUBBORN),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "started\n"
            started = psutil.Process(proc.pid).children(recursive=True)
            assert len(started) == 3, started  # sh, python, sleep
            os.killpg(proc.pid, signal.SIGTERM)
            _, alive = psutil.wait_procs(
                [psutil.Process(proc.pid), *started], timeout=20
            )
            assert not alive, [p.cmdline() for p in alive]
        finally:
            # The group this test made: with sh, PID 1, the namespace ends.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def test_import_dispynb_loads_no_ray() -> None:
    """Ray is an optional extra: dispynb and its Ray engine module load without it."""
    code = (
        "import sys, dispynb, dispynb.backends.ray as r\n"
        "engine = r.RayEngine('127.0.0.1:6379')\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
        "print(engine.name, sorted(engine.features))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ray ")


def test_nodes_on_ray_is_one_clear_error() -> None:
    """``JobCluster(f, nodes=[...], engine=RayEngine(...))``: Ray places the jobs on
    its own nodes, so a node list is refused (saying what to do instead) before
    anything connects to Ray, instead of being ignored."""
    code = (
        "import sys\n"
        "from dispynb import JobCluster, NodeAllocate\n"
        "from dispynb.backends.ray import RayEngine\n"
        "from dispynb.errors import NotSupportedError\n"
        "for nodes in (['10.0.0.2'], '10.0.0.2', [NodeAllocate('10.0.0.2', cpus=1)]):\n"
        "    try:\n"
        "        JobCluster(abs, nodes=nodes, engine=RayEngine('127.0.0.1:6379'))\n"
        "    except NotSupportedError as exc:\n"
        "        print(exc)\n"
        "assert 'ray' not in sys.modules, 'ray was imported: it tried to connect'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    errors = proc.stdout.strip().splitlines()
    assert len(errors) == 3, proc.stdout
    for error in errors:
        assert "is not supported on the 'ray' engine" in error
        assert "submit_node" in error and "RayEngine(address, cpus=N)" in error


#: A command prefix: what follows runs in a new network namespace with only loopback.
LOOPBACK_ONLY = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


@pytest.mark.timeout(120)
def test_an_address_where_no_ray_head_listens_is_a_quick_clear_error() -> None:
    """``RayEngine("host:6380")`` with nothing listening there (a typo, a head not
    started): ``ray.init`` retried for many minutes (20 attempts of ~40 s) while
    `JobCluster` waited; now a `TransportError` says so at once. Run under
    ``unshare -n``: ``ray.init`` probes an outside address for this host's IP."""
    reason = _cannot_unshare()
    if reason is not None:
        pytest.skip(reason)
    code = (
        "import socket, time\n"
        "import dispynb\n"
        "from dispynb.backends.ray import RayEngine\n"
        "from dispynb.errors import TransportError\n"
        "closed = socket.socket()\n"  # bound, not listening: connections refused
        "closed.bind(('127.0.0.1', 0))\n"
        "address = '127.0.0.1:%d' % closed.getsockname()[1]\n"
        "start = time.monotonic()\n"
        "try:\n"
        "    dispynb.JobCluster(abs, engine=RayEngine(address))\n"
        "except TransportError as exc:\n"
        "    print(round(time.monotonic() - start, 1), exc)\n"
    )
    proc = subprocess.run(
        [*LOOPBACK_ONLY, sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    seconds, _, text = proc.stdout.strip().partition(" ")
    assert text.startswith("cannot connect to the Ray cluster at 127.0.0.1:"), text
    assert "Connection refused" in text and "ray start --head" in text
    assert float(seconds) < 30


#: A program that starts a server that is not Ray (argv[1]: "silent" accepts and
#: says nothing, "http" answers as an HTTP server does) and opens a `JobCluster` on
#: its address; it prints the seconds that took and the error.
NOT_RAY_PROGRAM = """
import socket, sys, threading, time
import dispynb
from dispynb.backends.ray import RayEngine
from dispynb.errors import TransportError

server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
held = []


def serve():
    while True:
        conn, _ = server.accept()
        held.append(conn)
        if sys.argv[1] == "http":
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 400 Bad Request\\r\\nContent-Length: 0\\r\\n\\r\\n")


threading.Thread(target=serve, daemon=True).start()
address = "127.0.0.1:%d" % server.getsockname()[1]
start = time.monotonic()
try:
    dispynb.JobCluster(abs, engine=RayEngine(address))
except TransportError as exc:
    print(round(time.monotonic() - start, 1), exc)
"""


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("server", "found"),
    [
        ("silent", "it accepted the connection but sent nothing within 10 s"),
        ("http", "an HTTP server (it answered 'HTTP/1.1 400 Bad Request')"),
    ],
)
def test_an_address_where_something_else_listens_is_a_quick_clear_error(
    server: str, found: str
) -> None:
    """``RayEngine("host:8265")`` (Ray's dashboard) or any port where a server that
    is not Ray listens: ``ray.init`` retried for many minutes, its gRPC connection
    never made, while `JobCluster` waited; now a `TransportError` says what answered
    there and which ports Ray's are. Under ``unshare -n`` as the test above."""
    reason = _cannot_unshare()
    if reason is not None:
        pytest.skip(reason)
    proc = subprocess.run(
        [*LOOPBACK_ONLY, sys.executable, "-c", NOT_RAY_PROGRAM, server],
        env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    seconds, _, text = proc.stdout.strip().partition(" ")
    assert text.startswith("no Ray head answered at 127.0.0.1:"), text
    assert f"it is not Ray: {found}." in text, text
    assert "6379" in text and "ray://HOST:10001" in text and "8265" in text
    assert float(seconds) < 30
