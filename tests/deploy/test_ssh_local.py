"""`SSHNodes` and ``%dispy ssh`` as a user meets them, on this machine: a stand-in for
the ``ssh`` command runs the remote command here (the real sshd runs in
tests/multihost/test_ssh*.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

import dispynb.deploy.ssh as ssh_module
from dispynb.deploy import LaunchError, SSHNodes
from dispynb.jupyter.errors import MagicError
from dispynb.jupyter.magics import DispyMagics
from tests.nodeproc import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

#: ``ssh [options] -- HOST COMMAND`` runs COMMAND here; ``ssh -G HOST`` says the
#: host is 127.0.0.1 (so the node registers over loopback; $FAKE_SSH_HOSTNAME to
#: name another, as a ``Hostname`` line would); host ``blackhole`` never
#: answers (ssh waits for the TCP connection: 2 min without ConnectTimeout). Each
#: call is logged to $FAKE_SSH_LOG; ``ssh -G`` reports $FAKE_CONNECTTIMEOUT; host
#: ``denied`` refuses the key.
FAKE_SSH = f"""#!/bin/sh
echo "$*" >> "${{FAKE_SSH_LOG:-/dev/null}}"
for last; do :; done
case " $* " in *" -G "*)
  echo "hostname ${{FAKE_SSH_HOSTNAME:-127.0.0.1}}"
  echo "connecttimeout ${{FAKE_CONNECTTIMEOUT:-none}}"
  exit 0;;
esac
case " $* " in *" -- blackhole "*) exec sleep 600;; esac  # still connecting
case " $* " in *" -- denied "*) echo "Permission denied (publickey)." >&2; exit 255;;
esac
export PYTHONPATH={ROOT}
exec /bin/sh -c "$last"
"""


@pytest.fixture
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ``ssh`` first on PATH that runs the remote command on this machine."""
    directory = tmp_path / "bin"
    directory.mkdir()
    ssh = directory / "ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}:{Path('/usr/bin')}:{Path('/bin')}")
    return ssh


@pytest.fixture
def ip() -> Iterator[InteractiveShell]:
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "dispynb")
    yield shell
    with capture_output():
        shell.run_line_magic("dispy", "close")
    shell.run_line_magic("unload_ext", "dispynb")


def test_nodes_that_exit_at_once_are_reported_as_such(fake_ssh: Path) -> None:
    """A wrong --python: the error names the host and what the shell said, and does
    not claim a wait of 0 s (it said 'did not register ... within 0 s')."""
    nodes = SSHNodes(["node1"], python="/nonexistent/python", wait=30)
    with nodes, pytest.raises(LaunchError) as raised:
        nodes.node_specs()
    message = str(raised.value)
    assert "exited before registering" in message, message
    assert "within 0 s" not in message
    assert "ssh to node1 exited with status 127" in message
    assert "/nonexistent/python" in message


def test_a_failed_dispy_ssh_leaves_no_nodes_behind(
    ip: InteractiveShell, fake_ssh: Path
) -> None:
    """``%dispy ssh`` whose nodes cannot start says why, and leaves the notebook
    without nodes: ``%dispy status`` says so (it raised the launcher's LaunchError,
    shown as a traceback, the failed launcher kept as the session's nodes)."""
    with capture_output(), pytest.raises(MagicError, match="/nonexistent/python"):
        ip.run_line_magic("dispy", "ssh node1 --python /nonexistent/python")
    session = ip.magics_manager.registry[DispyMagics.__name__].session
    assert session.local is None and session.nodes is None
    status = ip.run_line_magic("dispy", "status")
    assert repr(status).startswith("no nodes"), repr(status)
    assert "no nodes" in status._repr_html_()


def test_a_failed_dispy_ssh_keeps_the_nodes_in_use(
    ip: InteractiveShell, fake_ssh: Path
) -> None:
    """``%dispy ssh`` whose nodes cannot start keeps the notebook's nodes, and says
    so (it stopped them first, leaving the notebook with none)."""
    with capture_output():
        ip.run_line_magic("dispy", "local --cpus 1")
    session = ip.magics_manager.registry[DispyMagics.__name__].session
    local = session.local
    with capture_output(), pytest.raises(MagicError) as raised:
        ip.run_line_magic("dispy", "ssh node1 --python /nonexistent/python")
    spec = local.node_specs()[0]
    assert f"still in use: local nodes {spec}" in str(raised.value)
    assert session.local is local and session.nodes is local and not local.exited()


def test_dispy_status_of_ssh_nodes_lists_them(
    ip: InteractiveShell, fake_ssh: Path
) -> None:
    with capture_output() as started:
        ip.run_line_magic("dispy", f"ssh node1 --cpus 1 --python {sys.executable}")
    assert started.stdout.startswith("dispynb: ssh nodes 127.0.0.1:"), started.stdout
    status = repr(ip.run_line_magic("dispy", "status"))
    assert status.startswith("ssh nodes 127.0.0.1:"), status


def test_dispy_status_neither_waits_for_nor_launches_nodes(
    ip: InteractiveShell, fake_ssh: Path
) -> None:
    """With no node running (scaled to 0, or adapt shrank them), ``%dispy status``
    says so: it asked the launcher for nodes as a new cluster does, which raised
    LaunchError (shown as a traceback), waited for nodes still starting, and under
    adapt launched one."""
    with capture_output():
        ip.run_line_magic("dispy", f"ssh node1 --cpus 1 --python {sys.executable}")
    nodes = ip.magics_manager.registry[DispyMagics.__name__].session.local
    nodes.scale(0)
    status = ip.run_line_magic("dispy", "status")
    assert repr(status).startswith("ssh nodes: none registered"), repr(status)
    assert "none registered" in status._repr_html_()
    assert len(nodes.events) == 3 and nodes.events[-1].action == "drain"


def test_events_hold_the_launches_of_start_and_the_stops_of_close(
    fake_ssh: Path,
) -> None:
    """``nodes.events`` keeps every launch, registration, drain and stop (as the
    deploying guide says): the nodes `start` launched and `close` stopped were
    missing (only ``adapt``'s and ``scale``'s were kept)."""
    nodes = SSHNodes(["node1"], python=sys.executable, node_args=["--cpus", "1"])
    with nodes:
        assert len(nodes.node_specs()) == 1
    actions = [(e.action, e.detail) for e in nodes.events]
    assert [a for a, _ in actions] == ["launch", "registered", "stopped"], actions
    assert actions[0][1] == "start" and actions[2][1] == "closed", actions
    assert len({e.node for e in nodes.events}) == 1


def test_a_node_that_close_stops_says_so_and_warns_not(
    fake_ssh: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``close()`` ended each node's standard input, and the node logged at WARNING
    'the process that started this node exited' and 'stopped (its parent process
    exited)': every routine close read as a crashed client in the node's log."""
    caplog.set_level("INFO", logger="dispynb.deploy.ssh")
    hosts = ["alice@node1"]
    with SSHNodes(hosts, python=sys.executable, node_args=["--cpus", "1"]) as nodes:
        nodes.wait_for(1)
        (name,) = [node.name for node in nodes.nodes]
    said = [r.getMessage() for r in caplog.records if r.name == "dispynb.deploy.ssh"]
    lines = "\n".join(said)
    assert "stopped (its launcher closed it)" in lines, lines
    # Its lines name it and its host, not "name@alice@node1".
    assert f"[{name} on alice@node1] " in lines, lines
    assert " WARNING " not in lines and "parent process exited" not in lines, lines


def blocked_signals(pid: int) -> int:
    """The signal mask of process ``pid`` (its main thread)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigBlk in /proc/{pid}/status")


def test_ssh_runs_with_no_signal_blocked(fake_ssh: Path) -> None:
    """``ssh`` is started by dispynb's I/O thread, which blocks SIGINT, SIGTERM,
    SIGHUP... (the main thread takes a Ctrl-C); a child inherits that mask, so ssh
    ignored the SIGTERM of a stop (ended by SIGKILL 5 s later), as did what it runs."""
    with SSHNodes(["blackhole"], python=sys.executable, wait=30) as nodes:
        (launched,) = nodes._launched
        assert launched.handle is not None
        assert blocked_signals(launched.handle.proc.pid) == 0


def test_close_does_not_wait_for_a_node_that_never_registered(
    fake_ssh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host that does not answer (ssh still connecting): close() ends ssh at once.
    It closed ssh's stdin and waited STOP_WAIT (15 s) for a node that was never
    started, then 5 s more for the SIGTERM ssh blocked: a notebook's %dispy close
    or a with block's end took 20 s."""
    monkeypatch.setattr(ssh_module, "STOP_WAIT", 600.0)
    nodes = SSHNodes(["blackhole", "node1"], python=sys.executable, wait=30)
    try:
        nodes.wait_for(1)
        (waiting,) = [x for x in nodes._launched if x.node is None]
        assert waiting.handle is not None
        ssh = waiting.handle.proc
        closing = threading.Thread(target=nodes.close, daemon=True)
        closing.start()
        closing.join(30)  # far below STOP_WAIT
        assert not closing.is_alive(), "close() waited for the node that never came"
        assert ssh.returncode is not None
    finally:
        nodes.close()


@pytest.mark.parametrize(("configured", "given"), [(None, "30"), ("5", None)])
def test_ssh_gets_a_connect_timeout_unless_configured(
    fake_ssh: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    configured: str | None,
    given: str | None,
) -> None:
    """A host that does not answer: without ConnectTimeout ssh waits for TCP's
    timeout (over 2 minutes, beyond the 60 s wait): the error then said 'still
    starting' and gave no cause. SSHNodes now gives ssh ConnectTimeout=30 when the
    user's ssh configuration (as ``ssh -G`` reports it) sets none."""
    log = tmp_path / "ssh.log"
    monkeypatch.setenv("FAKE_SSH_LOG", str(log))
    if configured is not None:
        monkeypatch.setenv("FAKE_CONNECTTIMEOUT", configured)
    with SSHNodes(["node1"], python=sys.executable, wait=30) as nodes:
        nodes.wait_for(1)
    (launch,) = [
        line for line in log.read_text().splitlines() if line.startswith("-T ")
    ]
    if given is None:
        assert "ConnectTimeout" not in launch
    else:
        assert f"-o ConnectTimeout={given} -- node1 " in launch


def test_a_node_still_starting_is_named_with_its_host(fake_ssh: Path) -> None:
    """The error names the address the node was told to register with (the one
    it must reach, which "check that they can reach this address" means), not
    the listener's "*:PORT"."""
    nodes = SSHNodes(["blackhole"], python=sys.executable, wait=1)
    with nodes, pytest.raises(LaunchError) as raised:
        nodes.node_specs()
    message = str(raised.value)
    told = f"127.0.0.1:{nodes.register_port}"  # what `ssh -G blackhole` routes to
    assert f"did not register with {told} within 1 s" in message, message
    assert "still starting on blackhole: no output yet (ssh connecting?)" in message


def test_an_ssh_failure_says_how_to_check_it(fake_ssh: Path) -> None:
    """ssh's own failure (status 255: refused key, unknown host key, no route) ends
    with what to try, not with 'check that dispynb is installed'."""
    nodes = SSHNodes(["denied"], python=sys.executable, ssh_options=["-p", "2222"])
    with nodes, pytest.raises(LaunchError) as raised:
        nodes.node_specs()
    message = str(raised.value)
    assert "ssh to denied exited with status 255 (Permission denied" in message
    assert "check that `ssh -p 2222 denied true` works here without a prompt" in (
        message
    )


def test_a_node_that_died_leaves_the_launchers_nodes(fake_ssh: Path) -> None:
    """A launched node killed (its host rebooted, kill -9) stayed in ``nodes`` for
    the launcher's life, registered but gone; now ``nodes`` lists the nodes that
    run, and ``exited()`` says why the dead one ended."""
    with SSHNodes(["node1", "node1"], python=sys.executable, wait=30) as nodes:
        nodes.wait_for(2)
        assert len(nodes.nodes) == 2
        dead, alive = nodes._launched
        node_pid = _node_process(dead.handle.proc.pid)
        os.kill(node_pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while dead.handle.proc.returncode is None:
            assert time.monotonic() < deadline, "the dead node's ssh did not exit"
            time.sleep(0.01)
        assert nodes.nodes == [alive.node]
        (why,) = nodes.exited()
        # The node's address first, as a LocalCluster's nodes (and panel rows) say.
        address = f"{dead.node.host}:{dead.node.port}"
        assert why.startswith(f"{address} ({dead.name}: ssh to node1 exited with")


def _mark_and_sleep(path: str, seconds: float) -> int:
    import pathlib
    import time

    pathlib.Path(path).touch()
    time.sleep(seconds)
    return 0


def test_jobs_on_a_launched_node_that_died_end_at_once_saying_why(
    fake_ssh: Path, tmp_path: Path
) -> None:
    """The launcher knows when a node's ssh session (or batch job) ended, yet its
    cluster tried to reconnect to the dead node for RECONNECT_FOR (60) s, and jobs
    submitted then waited for ever for a node to register (none was coming), saying
    nothing. The cluster now asks the launcher, as it asks a LocalCluster
    (``exit_reason``, ``expecting_nodes``): the jobs end at once, Abandoned, naming
    the node and how it ended."""
    from dispynb import DispyJob, JobCluster

    started = tmp_path / "started"
    with (
        SSHNodes(["node1"], python=sys.executable, wait=30) as nodes,
        JobCluster(_mark_and_sleep, nodes=nodes) as cluster,
    ):
        running = cluster.submit(str(started), 60)
        deadline = time.monotonic() + 20
        while not started.exists():
            assert time.monotonic() < deadline, running.status
            time.sleep(0.01)
        (launched,) = nodes._launched
        os.kill(_node_process(launched.handle.proc.pid), signal.SIGKILL)
        assert running.finish.wait(20), running.status
        assert running.status == DispyJob.Abandoned
        assert running.status == DispyJob.Abandoned
        later = cluster.submit(str(started), 0)
        assert later.finish.wait(20), "it waited for the dead node to come back"
        assert later.status == DispyJob.Abandoned
        expected = f"node {launched.name} ({launched.node.spec}) that SSHNodes launched"
        assert expected in (later.exception or ""), later.exception
        assert "ssh to node1 exited with status 137" in (later.exception or "")
        assert not nodes.expecting_nodes()


def _node_process(ssh_pid: int) -> int:
    """The node server run by the stand-in ``ssh`` process ``ssh_pid``."""
    import psutil

    ssh = psutil.Process(ssh_pid)
    # The node server itself (python -P -m nodeserver), not the shell whose
    # command line names it, nor its zygote (forked from it: the same command line).
    found = [
        p
        for p in [ssh, *ssh.children(recursive=True)]
        if p.cmdline()[1:4] == ["-P", "-m", "nodeserver"]
    ]
    top = [p for p in found if p.ppid() not in {q.pid for q in found}]
    assert len(top) == 1, f"no node server below the ssh process: {found}"
    return top[0].pid


#: Modules a user may well have in the directory a node starts in (the login
#: directory over SSH): each fails loudly if imported.
SHADOWS = ("dispynb", "nodeserver", "msgpack", "cloudpickle")


def _shadowing_files(directory: Path) -> None:
    for module in SHADOWS:
        (directory / f"{module}.py").write_text(
            f"raise SystemExit('the user\\'s {module}.py was imported')\n"
        )


def _square(x: int) -> int:
    return x * x


def test_a_users_module_where_the_node_starts_shadows_none_of_ours(
    fake_ssh: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m nodeserver`` put its start directory first on the path: a
    ``dispynb.py`` (or ``msgpack.py``...) of the user's there was imported instead
    of ours, and the node exited before registering. ``-P`` keeps it off."""
    import dispynb

    home = tmp_path / "home"
    home.mkdir()
    _shadowing_files(home)
    monkeypatch.chdir(home)  # where the stand-in ssh runs the node
    with (
        SSHNodes(["node1"], python=sys.executable, wait=30) as nodes,
        dispynb.JobCluster(_square, nodes=nodes) as cluster,
    ):
        job = cluster.submit(7)
        assert job() == 49, job.exception


def test_a_python_older_than_311_is_named_as_such(
    fake_ssh: Path, tmp_path: Path
) -> None:
    """Ubuntu 22.04's ``python3`` is 3.10: ``python3 -P`` said 'Unknown option:
    -P' then 'Try `python -h' for more information.'; now the error names the
    Python, its version and what to give."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "sitecustomize.py").write_text(
        "import sys\nsys.version_info = (3, 10, 12)\nsys.version = '3.10.12 (fake)'\n"
    )
    python = tmp_path / "python3.10"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={old} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    nodes = SSHNodes(["node1"], python=str(python), wait=30)
    with nodes, pytest.raises(LaunchError) as raised:
        nodes.node_specs()
    message = str(raised.value)
    assert (
        f"dispynb-node needs Python 3.11 or later; {sys.executable} is Python 3.10.12: "
        "give the launcher python= a newer one"
    ) in message, message


@pytest.mark.parametrize(
    ("hostname", "what"),
    [
        # a name that only the jump host in ~/.ssh/config resolves
        ("node1.internal", "cannot resolve 'node1.internal' ("),
        (
            "10.0.0.9",
            "this machine has no route to '10.0.0.9' (Network is unreachable)",
        ),
    ],
)
def test_a_host_this_machine_cannot_reach_says_to_give_register_host(
    fake_ssh: Path, hostname: str, what: str
) -> None:
    """ssh reaches the host (through a jump host, say), but this machine has no
    route of its own to the name ``ssh -G`` gives: the script's last line says so and
    names register_host= (before: "cannot find a route to 'node1.internal':
    [Errno -3] Temporary failure in name resolution"). Run without a network
    (``unshare -n``), so no name query leaves the machine."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs unshare -n as root: the name lookup must not leave")
    script = "from dispynb.deploy import SSHNodes\nSSHNodes(['node1'], wait=10)\n"
    env = dict(os.environ, PYTHONPATH=str(ROOT), FAKE_SSH_HOSTNAME=hostname)
    done = subprocess.run(
        [unshare, "-n", sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dispynb.errors.ConfigurationError: {what}"), done.stderr
    assert last.endswith(
        ", so it cannot tell at which of its addresses the nodes there register: "
        "check the name, or give register_host= this machine's address that they "
        "reach (for a host that ssh reaches through a jump host, say)"
    ), done.stderr


#: A notebook behind a jump host: ``%dispy ssh`` without, then with --register-host.
JUMP_HOST_NOTEBOOK = f"""
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
ip.run_line_magic("load_ext", "dispynb")
line = "ssh node1 --cpus 1 --python {sys.executable}"
try:
    ip.run_line_magic("dispy", line)
except Exception as exc:
    print(f"WITHOUT: {{type(exc).__name__}}: {{exc}}".replace(chr(10), " "))
ip.run_line_magic("dispy", line + " --register-host 127.0.0.1")
print("STATUS:", repr(ip.run_line_magic("dispy", "status")))
ip.run_line_magic("dispy", "close")
"""


def test_dispy_ssh_behind_a_jump_host_registers_with_register_host(
    fake_ssh: Path,
) -> None:
    """``%dispy ssh`` to a host whose name only the jump host resolves: the error
    said "give register_host=", which the magic had no option for. It says
    --register-host, and with it the node registers at that address. Run without
    a network (``unshare -n``, loopback up), so no name query leaves the machine."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs unshare -n as root: the name lookup must not leave")
    env = dict(os.environ, PYTHONPATH=str(ROOT), FAKE_SSH_HOSTNAME="node1.internal")
    done = subprocess.run(
        [
            unshare,
            "-n",
            "sh",
            "-c",
            'ip link set lo up && exec "$0" -c "$1"',
            sys.executable,
            JUMP_HOST_NOTEBOOK,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=45,
    )
    said = done.stdout.splitlines()
    without = [line for line in said if line.startswith("WITHOUT:")]
    assert len(without) == 1, done
    assert without[0].startswith(
        "WITHOUT: MagicError: %dispy ssh could not start nodes on node1: cannot "
        "resolve 'node1.internal' ("
    ), without
    assert (
        "or give --register-host this machine's address that they reach" in (without[0])
    ), without
    assert "register_host=" not in without[0], without
    assert any(line.startswith("STATUS: ssh nodes 127.0.0.1:") for line in said), done


def test_a_python_without_dispynb_is_named_with_the_fix(
    fake_ssh: Path, tmp_path: Path
) -> None:
    """The host's default python3 is not the environment dispynb went into: the
    error showed only "python3: No module named nodeserver", the advice being to
    check that ssh works. Now it names the Python and what to do."""
    import venv

    bare = tmp_path / "bare"  # a Python of the right version, without dispynb
    venv.EnvBuilder(with_pip=False).create(bare)
    python = tmp_path / "python3"  # PYTHONPATH (the checkout) unset, as on a host
    python.write_text(f'#!/bin/sh\nunset PYTHONPATH\nexec {bare}/bin/python "$@"\n')
    python.chmod(0o755)
    nodes = SSHNodes(["node1"], python=str(python), wait=30)
    with nodes, pytest.raises(LaunchError) as raised:
        nodes.node_specs()
    message = str(raised.value)
    assert (
        f"ssh to node1 exited with status 1 ({bare}/bin/python: No module named "
        f"nodeserver): dispynb is not installed for {python} on node1; install "
        "dispynb there, or give python= the Python that has it"
    ) in message, message
