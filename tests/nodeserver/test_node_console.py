"""Commands typed on ``dispynb-node``'s standard input, as on dispynode's.

Each test starts the real node with its standard input a pipe, writes the commands
a user would type, and checks their effect with a real client and the node's
answers (its standard output, which the test's log file holds with its log lines).
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from dispynb.errors import NodeNotServingError
from nodeserver.console import HELP
from tests.jobs import WAIT, wait_until
from tests.nodeproc import (
    NODE_WAIT,
    CliNode,
    node_command,
    node_env,
    start_node,
    write_secret_file,
)

pytestmark = pytest.mark.slow


def started_then_gate(directory: str, name: str) -> bool:
    """A job: say it started (a file ``name``), wait for the file ``gate``; return
    whether the gate was open when it started."""
    import os
    import time

    was_open = os.path.exists(os.path.join(directory, "gate"))
    with open(os.path.join(directory, name), "w"):
        pass
    while not os.path.exists(os.path.join(directory, "gate")):
        time.sleep(0.01)
    return was_open


def double(x: int) -> int:
    return 2 * x


@contextlib.contextmanager
def console_node(directory: Path, *args: str) -> Iterator[CliNode]:
    """A node of 2 CPUs whose standard input is a pipe; stopped at the end."""
    node = start_node(directory, *args, cpus=2, stdin=subprocess.PIPE)
    try:
        yield node
    finally:
        assert node.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            node.proc.stdin.close()
        node.stop()


def type_line(node: CliNode, line: str, answer: str) -> str:
    """Type ``line`` on the node's console; wait for ``answer`` in what it wrote
    after it; return that."""
    before = len(node.log_text())
    assert node.proc.stdin is not None
    node.proc.stdin.write(line.encode() + b"\n")
    node.proc.stdin.flush()
    wait_until(lambda: answer in node.log_text()[before:])
    return node.log_text()[before:]


@contextlib.contextmanager
def gated_job(node: CliNode, directory: Path) -> Iterator[DispyJob]:
    """A client's job that started on ``node`` and waits for ``directory/gate``."""
    with JobCluster(started_then_gate, nodes=[node.spec], secret=node.secret) as c:
        job = c.submit(str(directory), "first")
        wait_until((directory / "first").exists)
        yield job


def run_one(node: CliNode) -> JobCluster:
    """A client whose one job ran on ``node``."""
    cluster = JobCluster(double, nodes=[node.spec], secret=node.secret)
    job = cluster.submit(21)
    assert job.wait(timeout=WAIT) and job() == 42
    return cluster


def test_cpus_serves_that_many_from_now_on(tmp_path: Path) -> None:
    """``cpus 1`` on a 2-CPU node: a connected client's second job waits for the
    first (it starts once the gate is open), a new client is told 1 CPU; ``cpus``
    alone takes the number on the next line, as dispynode's."""
    with console_node(tmp_path / "node") as node:
        cluster = JobCluster(started_then_gate, nodes=[node.spec], secret=node.secret)
        try:
            type_line(node, "cpus 1", "serving 1 CPU")
            first = cluster.submit(str(tmp_path), "first")
            second = cluster.submit(str(tmp_path), "second")
            wait_until((tmp_path / "first").exists)
            (tmp_path / "gate").touch()
            assert first.wait(timeout=WAIT) and second.wait(timeout=WAIT)
            assert (first(), second()) == (False, True)
            with JobCluster(double, nodes=[node.spec], secret=node.secret) as other:
                assert [n.cpus for n in other.status().nodes] == [1]
        finally:
            cluster.close()
        type_line(node, "cpus", "CPUs to serve")
        type_line(node, "2", "serving 2 CPUs")
        with JobCluster(double, nodes=[node.spec], secret=node.secret) as other:
            assert [n.cpus for n in other.status().nodes] == [2]
        answer = type_line(node, "cpus two", "cpus needs one whole number")
        assert "not 'two'" in answer
        type_line(node, "cpus 0", "cpus 0: give 1 or more")
        assert node.proc.poll() is None


def test_stop_takes_no_new_clients_and_start_takes_them_again(tmp_path: Path) -> None:
    with console_node(tmp_path / "node") as node:
        connected = run_one(node)
        try:
            type_line(node, "stop", "taking no new clients")
            # Told why: a closed port read as a node that does not run.
            with pytest.raises(NodeNotServingError) as refused:
                JobCluster(double, nodes=[node.spec], secret=node.secret)
            assert str(refused.value) == (
                f"{node.spec}: node 'cli-node' takes no new clients: stopped on its "
                "console (start there takes them again)"
            )
            # The connected client goes on.
            job = connected.submit(1)
            assert job.wait(timeout=WAIT) and job() == 2
            status = type_line(node, "", "1 client connected")
            assert "taking no new clients (type start)" in status
            type_line(node, "start", "taking new clients again")
            run_one(node).close()
        finally:
            connected.close()


def test_quit_stops_the_node_terminating_its_running_jobs(tmp_path: Path) -> None:
    with console_node(tmp_path / "node") as node:
        with gated_job(node, tmp_path) as job:
            type_line(node, "quit", "stopping: running jobs are terminated")
            assert node.proc.wait(NODE_WAIT) == 0
            assert job.wait(timeout=WAIT)
            assert job.status != DispyJob.Finished  # the gate never opened
        log = node.log_text()
        assert log.rstrip().endswith("stopped ('quit' typed on its standard input)")


def test_exit_stops_the_node_letting_running_jobs_finish(tmp_path: Path) -> None:
    """``exit`` drains as SIGTERM does; ``quit`` meanwhile would end it at once,
    other commands are told that the node is stopping."""
    with console_node(tmp_path / "node") as node:
        with gated_job(node, tmp_path) as job:
            type_line(node, "exit", "running jobs get the drain timeout")
            type_line(node, "start", "start: the node is stopping already")
            (tmp_path / "gate").touch()
            assert job.wait(timeout=WAIT) and job.status == DispyJob.Finished
            assert node.proc.wait(NODE_WAIT) == 0
        assert "stopped ('exit' typed on its standard input)" in node.log_text()


def test_status_unknown_commands_and_help(tmp_path: Path) -> None:
    with console_node(tmp_path / "node") as node:
        cluster = run_one(node)
        try:
            status = type_line(node, "status", "1 client connected")
            assert "node 'cli-node': taking new clients; 0 of 2 CPUs busy" in status
            assert "1 computation" in status
        finally:
            cluster.close()
        answer = type_line(node, "Frobnicate now", "unknown command")
        assert f"unknown command 'frobnicate now'\n{HELP}" in answer
        assert HELP in type_line(node, "help", "commands:")
        assert node.proc.poll() is None


def test_daemon_reads_no_commands(tmp_path: Path) -> None:
    """With ``--daemon`` what is typed is not read: ``quit`` stops nothing."""
    with console_node(tmp_path / "node", "--daemon") as node:
        assert node.proc.stdin is not None
        node.proc.stdin.write(b"quit\n")
        node.proc.stdin.flush()
        run_one(node).close()  # time enough for the node to have read it
        assert node.proc.poll() is None
        assert "stopping" not in node.log_text()


def test_a_parent_pipe_on_stdin_is_no_console(tmp_path: Path) -> None:
    """``--parent-pipe 0`` (the ssh launcher's): what comes there is the launcher's,
    its end stops the node; "quit" in it is no command."""
    node = start_node(
        tmp_path / "node", "--parent-pipe", "0", cpus=2, stdin=subprocess.PIPE
    )
    assert node.proc.stdin is not None
    node.proc.stdin.write(b"quit\nstop\n")  # stop: the launcher's last words
    node.proc.stdin.close()
    assert node.stop() == 0
    log = node.log_text()
    assert log.rstrip().endswith("stopped (its launcher closed it)"), log


@pytest.mark.parametrize("stdin", ["devnull", "closed pipe"])
def test_a_node_at_the_end_of_its_input_goes_on_serving(
    tmp_path: Path, stdin: str
) -> None:
    """A launcher's /dev/null, or a pipe closed after a command: dispynode exited
    there; the node goes on serving (and does the command read before)."""
    if stdin == "devnull":
        node = start_node(tmp_path / "node", cpus=2)
    else:
        node = start_node(tmp_path / "node", cpus=2, stdin=subprocess.PIPE)
        assert node.proc.stdin is not None
        node.proc.stdin.write(b"cpus 1")  # the last line needs no newline
        node.proc.stdin.close()
    try:
        if stdin != "devnull":
            wait_until(lambda: "serving 1 CPU" in node.log_text())
        for _ in range(2):
            run_one(node).close()
        assert node.proc.poll() is None
    finally:
        node.stop()


def read_terminal_until(master: int, text: str) -> str:
    """What the node wrote on its terminal, read until ``text`` shows."""
    seen = b""
    deadline = time.monotonic() + WAIT
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{text!r} not on the terminal within {WAIT} s: {seen!r}"
        if select.select([master], [], [], left)[0]:
            seen += os.read(master, 4096)
    return seen.decode(errors="replace")


def test_commands_typed_in_the_nodes_terminal(tmp_path: Path) -> None:
    """The node in the foreground of a terminal (a pseudo-terminal, as a user's):
    it says how to list its commands, answers there, and quits."""
    port_file = tmp_path / "port"
    command = node_command(
        "-c", "2", "-i", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
        "--secret-file", str(write_secret_file(tmp_path / "secret", "tty-secret")),
        "--dest-path", str(tmp_path / "dest"),
    )  # fmt: skip
    env = node_env()
    pid, master = pty.fork()
    if pid == 0:  # the child: the terminal's session leader, in its foreground
        try:
            os.execve(command[0], command, env)
        finally:
            os._exit(127)
    try:
        read_terminal_until(master, "type help (then Enter) for the node's commands")
        wait_until(port_file.exists)
        os.write(master, b"\n")
        read_terminal_until(master, "0 of 2 CPUs busy")
        os.write(master, b"quit\n")
        read_terminal_until(master, "stopped ('quit' typed on its standard input)")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(master)
