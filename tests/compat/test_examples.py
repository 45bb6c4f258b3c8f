"""Programs written the way dispy's example programs use its API (one per example:
tests/compat/examples/, our own code after the idea of each, never dispy's text),
run as a dispy user runs them.

Each does what its dispy example does with ``import dispynb as dispy``, its nodes
named where the example discovers them (``DISPYNB_TEST_NODES``), its sleeps short.
They run against two ``dispynb-node`` processes started with dispynode's own options
(`dispynodes`, shared with test_programs.py), in a fresh directory, and the test does
what their user does: types ``quit`` or presses Ctrl-C, opens the web monitor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from dispynb.defaults import SECRET_ENV, SECRET_FILE_ENV
from tests.compat.test_programs import (
    PROGRAM_TIMEOUT,
    Nodes,
    check_stdout,
    dispynodes,
    status_table,
)
from tests.jobs import is_computation_process, wait_until
from tests.sigint import python_handles_sigint

__all__ = ["dispynodes"]  # the fixture, shared with test_programs.py

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

EXAMPLES = Path(__file__).parent / "examples"
R = re.compile
#: The names dispynodes gives its nodes.
NODE = r"local-[01]"


class Example:
    """One example running as a subprocess, its output read as it comes."""

    def __init__(
        self,
        name: str,
        nodes: Nodes,
        cwd: Path,
        *files: str,
        args: tuple[str, ...] = (),
    ) -> None:
        for file in (f"{name}.py", *files):
            shutil.copy2(EXAMPLES / file, cwd)
        self.name = name
        self.cwd = cwd
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in (SECRET_ENV, SECRET_FILE_ENV)
        }
        env[SECRET_ENV] = nodes.secret
        env["DISPYNB_TEST_NODES"] = ",".join(nodes.node_specs())
        env["PYTHONUNBUFFERED"] = "1"
        # Python's SIGINT handler in it, as in a terminal's foreground job (a
        # shell's background job, CI's run, inherits SIGINT ignored).
        with python_handles_sigint():  # exec turns the handler into SIG_DFL
            self.proc = subprocess.Popen(
                [sys.executable, f"{name}.py", *args],
                cwd=cwd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # its own process group, as at a terminal
            )
        self._changed = threading.Condition()
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            for stream, lines in (
                (self.proc.stdout, self.out),
                (self.proc.stderr, self.err),
            )
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: object, lines: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._changed:
                lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(
        self, pattern: re.Pattern[str], count: int = 1, stderr: bool = False
    ) -> list[re.Match[str]]:
        """The first ``count`` lines of stdout (stderr) ``pattern`` is found in, once
        the program printed them; fails the test if it ends or takes too long first."""
        lines = self.err if stderr else self.out
        deadline = time.monotonic() + PROGRAM_TIMEOUT
        with self._changed:
            while True:
                found = [m for line in lines if (m := pattern.search(line))]
                if len(found) >= count:
                    return found[:count]
                if self.proc.poll() is not None and not any(
                    r.is_alive() for r in self._readers
                ):
                    self.fail(f"ended before printing {count} x /{pattern.pattern}/")
                if time.monotonic() > deadline:
                    self.fail(f"did not print {count} x /{pattern.pattern}/")
                self._changed.wait(0.1)

    def type(self, text: str) -> None:
        """What its user types at its prompt."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def finish(self) -> tuple[str, str]:
        """Its stdout and stderr once it exited with 0."""
        try:
            code = self.proc.wait(PROGRAM_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail(f"did not end in {PROGRAM_TIMEOUT} s")
        self._close()
        if code != 0:
            self.fail(f"exit code {code}")
        return "".join(self.out), "".join(self.err)

    def __enter__(self) -> Example:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Kill it if the test failed while it ran."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        for reader in self._readers:
            reader.join(PROGRAM_TIMEOUT)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def fail(self, problem: str) -> None:
        self.__exit__()
        pytest.fail(
            f"{self.name}.py {problem}\n--- stdout ---\n{''.join(self.out)}"
            f"--- stderr ---\n{''.join(self.err)[-6000:]}"
        )


def split_lines(
    out: str, *patterns: re.Pattern[str]
) -> tuple[list[re.Match[str]], list[str]]:
    """The non-blank lines of ``out`` that match one of ``patterns`` (printed by
    callbacks, in an order the example does not fix), and the other lines, in order."""
    matched, rest = [], []
    for line in out.splitlines():
        if not line.strip():
            continue
        match = next((m for p in patterns if (m := p.fullmatch(line))), None)
        if match is None:
            rest.append(line)
        else:
            matched.append(match)
    return matched, rest


def assert_lines(lines: list[str], expected: list[str | re.Pattern[str]]) -> None:
    problems = check_stdout("\n".join(lines), expected)
    assert not problems, "\n".join(problems) + "\n" + "\n".join(lines)


def test_obj_instances(dispynodes: Nodes, tmp_path: Path) -> None:
    """Instances of a class given in ``depends`` are sent as arguments; what the
    computation prints comes back in ``job.stdout``."""
    with Example("obj_instances", dispynodes, tmp_path) as example:
        out, _ = example.finish()
    assert_lines(
        out.splitlines(),
        [R(rf"{i}: (\d\.\d\d) / {i}: \1") for i in range(10)],
    )


def test_httpd_example(dispynodes: Nodes, tmp_path: Path) -> None:
    """``dispy.httpd.DispyHTTPServer(cluster)`` serves the monitor's page and the
    cluster's state while the jobs run; ``shutdown()`` then lets the program end."""
    with Example("httpd_example", dispynodes, tmp_path) as example:
        (url,) = example.wait_for(
            R(r"web monitor of 'compute' at (http://127\.0\.0\.1:\d+/)\?token=(\S+)"),
            stderr=True,
        )
        base, token = url.group(1), url.group(2)
        # as a browser opens the URL: it keeps the cookie the monitor sets for the token
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with browser.open(f"{base}?token={token}", timeout=10) as page:
            assert page.status == 200
            assert page.headers.get_content_type() == "text/html"
            assert "<html" in page.read().decode().lower()
        # the page's script then asks for the cluster with the token, as it polls
        api = urllib.request.Request(
            f"{base}api/cluster", headers={"Authorization": f"Token {token}"}
        )

        def names() -> list[str]:
            with browser.open(api, timeout=10) as reply:
                return sorted(node["name"] for node in json.load(reply)["nodes"])

        # JobCluster() returned once a first node was set up: the other may follow
        wait_until(lambda: names() == ["local-0", "local-1"], PROGRAM_TIMEOUT)
        out, _ = example.finish()
    assert out == ""


def test_job_scheduler(dispynodes: Nodes, tmp_path: Path) -> None:
    """``cluster_status`` submits each next file's job with ``submit_node`` and
    ``dispy_job_depends``, one job per node; ``quit`` then waits and prints the
    status."""
    sums = {}
    for i in range(4):
        data = os.urandom(200_000 + i)
        (tmp_path / f"data{i:03d}").write_bytes(data)
        sums[f"data{i:03d}"] = hashlib.sha1(data).hexdigest()
    with Example("job_scheduler", dispynodes, tmp_path) as example:
        example.wait_for(R(r"^data\d{3} sha1 "), count=4)
        example.type("quit\n")
        out, _ = example.finish()
    found, rest = split_lines(
        out,
        R(r"node 127\.0\.0\.1 ready: 2 CPUs"),
        R(r"(data\d{3}) sha1 ([0-9a-f]{40})"),
    )
    assert len(found) == 6, out
    assert {m.group(1): m.group(2) for m in found if m.lastindex} == sums, out
    assert_lines(rest, status_table(2))


def jobs_sleeping(earlier: set[int]) -> int:
    """How many of the nodes' computation workers (below this test process, not in
    ``earlier``: other programs') sleep in ``time.sleep``, as a job of longrun.py
    does in its loop once it runs (an idle worker waits for its next job instead):
    the kernel's wait channel of each."""
    return sum(
        "hrtimer_nanosleep" in channels
        for pid, channels in wait_channels().items()
        if pid not in earlier
    )


def wait_channels() -> dict[int, list[str]]:
    """The wait channel of each thread of the computation processes, by pid."""
    channels = {}
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, OSError):
            if is_computation_process(proc):
                tasks = Path(f"/proc/{proc.pid}/task").iterdir()
                channels[proc.pid] = [(task / "wchan").read_text() for task in tasks]
    return channels


@pytest.mark.parametrize("how", ["quit", "Ctrl-C"])
def test_longrun(how: str, dispynodes: Nodes, tmp_path: Path) -> None:
    """Jobs that run until cancelled, submitted by ``cluster_status`` as each node
    is set up: ``quit`` (or Ctrl-C at the prompt) cancels them, each catches
    KeyboardInterrupt and returns its best value, which the program prints."""
    if all(
        Path(f"/proc/{proc.pid}/wchan").read_text() == "0"
        for proc in psutil.Process().children(recursive=True)
    ):  # the nodes wait for clients: "0" means hidden, not running
        pytest.skip("this kernel hides wait channels (/proc/PID/wchan)")
    earlier = set(wait_channels())
    # Margin 0: a first provisional result over 0.99 (about 1 run in 25 with its
    # 4 jobs) would otherwise stop the program itself before the test's quit.
    with Example("longrun", dispynodes, tmp_path, args=("0",)) as example:
        example.wait_for(R(r"node 127\.0\.0\.1 set up with 2 CPUs"), count=2)
        # its user waits for the jobs to run: quit before the callback has added them
        # all to the set the program then goes through fails in dispy too
        try:
            wait_until(lambda: jobs_sleeping(earlier) == 4, PROGRAM_TIMEOUT)
        except AssertionError:
            example.fail(f"jobs never all ran: wait channels {wait_channels()}")
        if how == "quit":
            example.type("quit\n")
        else:  # the terminal sends SIGINT to the foreground process group
            os.killpg(example.proc.pid, signal.SIGINT)
        out, _ = example.finish()
    prompt = "Type quit (or exit, or press Ctrl-C) to stop: "
    assert out.count(prompt) == 1, out  # input()'s prompt, a callback's line after it
    found, rest = split_lines(
        out.replace(prompt, ""),
        R(rf"allocating compute on 127\.0\.0\.1 \({NODE}\), 2 CPUs"),
        R(r"node 127\.0\.0\.1 set up with 2 CPUs"),
        R(r"job on 127\.0\.0\.1 returned (0\.\d+|1\.0)"),
    )
    results = [float(m.group(1)) for m in found if m.lastindex]
    assert (len(found), len(results)) == (8, 4), out
    assert_lines(rest, [f"best value found: {max(results)}", *status_table(2)])


def test_replace_inmem(dispynodes: Nodes, tmp_path: Path) -> None:
    """``NodeAllocate.allocate`` gives each node its file and ``setup_args``;
    ``setup`` loads it in memory, jobs hash it, ``resetup_node`` loads it again."""
    with Example("replace_inmem", dispynodes, tmp_path) as example:
        out, _ = example.finish()
    data = (tmp_path / "replace_inmem.py").read_bytes()
    found, rest = split_lines(
        out,
        R(
            rf'node 127\.0\.0\.1 \({NODE}\) holds "{re.escape(str(tmp_path))}/'
            r'replace_inmem\.py"'
        ),
        R(r"job (\d+) on 127\.0\.0\.1: (\w+) of replace_inmem\.py = (\w+)"),
    )
    jobs = {int(m.group(1)): (m.group(2), m.group(3)) for m in found if m.lastindex}
    assert sorted(jobs) == list(range(1, 13)), out
    for algorithm, digest in jobs.values():
        assert hashlib.new(algorithm, data).hexdigest() == digest, out
    # both nodes set up, then resetup_node('127.0.0.1') sets one up again: dispy
    # names nodes by address, and both of the test's nodes are at 127.0.0.1
    assert len(found) - len(jobs) == 3, out
    assert_lines(rest, status_table(2))


def test_node_update(dispynodes: Nodes, tmp_path: Path) -> None:
    """A program computation (node_update_script.py) run once on each node as it is
    set up; its output comes back as bytes in ``job.stdout``."""
    with Example(
        "node_update", dispynodes, tmp_path, "node_update_script.py"
    ) as example:
        out, _ = example.finish()
    found, rest = split_lines(
        out,
        R(r"node 127\.0\.0\.1 ready: 2 CPUs"),
        R(r"node 127\.0\.0\.1 updated at (\w{3} \w{3} [ \d]\d [\d:]{8} \d{4})"),
    )
    assert len(found) == 4, out
    assert len([m for m in found if m.lastindex]) == 2, out
    assert_lines(rest, status_table(2))


class PortForward:
    """What ``ssh -L PORT:127.0.0.1:NODE_PORT`` does on this host, without ssh: a
    port of 127.0.0.1 whose connections are relayed to the node's."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            node = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, node]
            for pair in ((client, node), (node, client)):
                thread = threading.Thread(target=self._relay, args=pair)
                self.threads.append(thread)
                thread.start()

    @staticmethod
    def _relay(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(PROGRAM_TIMEOUT)
        for sock in self.sockets:
            sock.close()


@dataclass
class Forwarded:
    """The test's first node, named by a port forwarded to it."""

    secret: str
    port: int

    def node_specs(self) -> list[str]:
        return [f"127.0.0.1:{self.port}"]


def test_sshportfw(dispynodes: Nodes, tmp_path: Path) -> None:
    """A node reached through a forwarded port (the migration guide's ``ssh -L``
    in place of the example's ``ssh -R``), ``ip_addr=`` for the client (dispy's
    deprecated keyword, logged as such); jobs use ``time``, which dispy's nodes
    let them use without importing it."""
    node_port = int(dispynodes.node_specs()[0].rsplit(":", 1)[1])
    forward = PortForward(node_port)
    try:
        with Example(
            "sshportfw", Forwarded(dispynodes.secret, forward.port), tmp_path
        ) as example:
            out, err = example.finish()
    finally:
        forward.close()
    assert forward.sockets, "the program did not connect through the forwarded port"
    assert_lines(out.splitlines(), [f"result: {n}" for n in range(1, 7)])
    assert "'ip_addr' is deprecated: use 'host' instead" in err
