"""A node server forks its computation processes from a zygote (`nodeserver.zygote`).

Real ``python -m nodeserver`` processes and a real client: the process tree, what a
computation process looks like to a job, and what happens when the zygote, or the
node, dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from dispynb import DispyJob, JobCluster
from dispynb.errors import SetupError
from dispynb.protocol import serialize
from dispynb.protocol.messages import (
    ComputationClose,
    ComputationClosed,
    ComputationSetup,
)
from dispynb.transport.connection import Connection
from dispynb.transport.connector import connect
from nodeserver.zygote import ANSWER_TIMEOUT, COMPUTE_NAME, ZYGOTE_NAME
from tests.jobs import WAIT, computation_processes, mark_and_hold, square, wait_until
from tests.nodeproc import CliNode, running_node, start_node

pytestmark = pytest.mark.slow


def describe(_: object = None) -> dict[str, Any]:
    """What a job sees of its process and of its computation process."""
    import os
    import random

    import psutil

    computation = psutil.Process(os.getppid())
    return {
        "pid": os.getpid(),
        "computation": computation.pid,
        "computation_name": computation.name(),
        "computation_parent": computation.ppid(),
        "cwd": os.getcwd(),
        "stdin": os.readlink("/proc/self/fd/0"),
        "ignored": [_ignored(pid) for pid in (os.getpid(), computation.pid)],
        "random": random.random(),
    }


def _ignored(pid: int) -> int:
    """Which of SIGINT and SIGTERM process ``pid`` ignores (a bit mask)."""
    import signal

    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigIgn:"):
                mask = int(line.split()[1], 16)
    wanted = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    return mask & wanted


def run_describe(node: CliNode) -> dict[str, Any]:
    with JobCluster(describe, nodes=[node.spec], secret=node.secret) as cluster:
        job = cluster.submit(None)
        result = job()
        assert job.status == DispyJob.Finished, job.exception
        return dict(result)


def zygote_of(node: CliNode) -> psutil.Process:
    """The node's zygote, once it has named itself: the node forks it before it
    listens, but a loaded machine may not have run the child far enough yet."""

    def named() -> list[psutil.Process]:
        return [
            child
            for child in psutil.Process(node.proc.pid).children()
            if child.name() == ZYGOTE_NAME
        ]

    wait_until(lambda: len(named()) == 1)
    return named()[0]


def test_computation_processes_are_forked_from_the_zygote(tmp_path: Path) -> None:
    with running_node(tmp_path / "node") as node:
        zygote = zygote_of(node)
        first = run_describe(node)
        second = run_describe(node)
        # Forked by the zygote, named, and looking like a new process to the job.
        assert first["computation_parent"] == zygote.pid
        assert first["computation_name"] == COMPUTE_NAME
        assert first["cwd"].startswith(str(tmp_path / "node" / "dest"))
        assert first["stdin"] == os.devnull
        # The zygote ignores SIGINT and SIGTERM; its children must not (nor what
        # their jobs exec).
        assert first["ignored"] == [0, 0]
        # Each computation its own process, with its own random sequence.
        assert first["computation"] != second["computation"]
        assert first["random"] != second["random"]
        # Once closed, a computation leaves nothing behind but the zygote.
        wait_until(lambda: not computation_processes(psutil.Process(node.proc.pid)))
        assert zygote.is_running()
    assert not zygote.is_running()  # reaped by the node, not left a zombie


def test_without_zygote_computations_are_new_interpreters(tmp_path: Path) -> None:
    with running_node(tmp_path / "node", launcher=["env", "DISPYNB_ZYGOTE=0"]) as node:
        assert not psutil.Process(node.proc.pid).children()
        seen = run_describe(node)
        computation = psutil.Process(node.proc.pid)
        assert seen["computation_parent"] == computation.pid
        assert seen["computation_name"] != COMPUTE_NAME


def test_a_killed_zygote_is_reaped_at_once_and_means_new_interpreters(
    tmp_path: Path,
) -> None:
    """kill -9 of the zygote from outside: the node reaps it at once and says so,
    with no client asking for a computation (it stayed a zombie of the node until
    the next setup needed the zygote); a client's next computation still runs, as
    a new interpreter."""
    with running_node(tmp_path / "node") as node:
        zygote = zygote_of(node)
        zygote.kill()
        wait_until(lambda: not psutil.pid_exists(zygote.pid))
        wait_until(lambda: "zygote process" in node.log_text())
        assert (
            f"the zygote process (pid {zygote.pid}) was killed by SIGKILL: "
            "computations start as new processes from now on"
        ) in node.log_text()
        seen = run_describe(node)  # nothing lost: the next computation still runs
        assert seen["computation_parent"] == node.proc.pid


def test_a_zygote_that_does_not_answer_fails_the_setup_and_is_replaced(
    tmp_path: Path,
) -> None:
    """A zygote that stops answering (stopped here; stuck under load or in the
    kernel alike) no longer holds computations' setups for ever: one fails within
    its setup_timeout with an error that says why; after `ANSWER_TIMEOUT` the
    zygote is killed (and reaped), and the computations waiting for it, and the
    next ones, start as new processes."""
    with running_node(tmp_path / "node") as node:
        zygote = zygote_of(node)
        zygote.suspend()
        with pytest.raises(SetupError) as raised:
            JobCluster(square, nodes=[node.spec], secret=node.secret, setup_timeout=2)
        assert str(raised.value) == (
            f"{node.spec}: the node's process maker (its zygote, pid {zygote.pid}) "
            "did not answer in 2 s (setup_timeout)"
        )
        # Its request still holds the zygote, until ANSWER_TIMEOUT.
        seen = run_describe(node)
        assert seen["computation_parent"] == node.proc.pid
        wait_until(lambda: not psutil.pid_exists(zygote.pid))  # killed, reaped
        text = node.log_text()
        assert f"did not answer in {ANSWER_TIMEOUT:g} s: killing it" in text
        assert run_describe(node)["computation_parent"] == node.proc.pid


def test_zygote_and_computations_die_with_a_killed_node(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", cpus=2)
    try:
        marker = tmp_path / "marker"
        cluster = JobCluster(_sleep_marked, nodes=[node.spec], secret=node.secret)
        try:
            cluster.submit(str(marker))
            wait_until(marker.exists)
            zygote = zygote_of(node)
            below = [zygote, *computation_processes(psutil.Process(node.proc.pid))]
            assert len(below) >= 2
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(WAIT)
            _gone, alive = psutil.wait_procs(below, timeout=WAIT)
            assert alive == []
        finally:
            cluster.close(terminate=True)
    finally:
        node.stop()


def test_a_killed_zygotes_computations_are_adopted_by_the_node(
    tmp_path: Path,
) -> None:
    """The zygote killed (kill -9, the OOM killer) while a job runs: its computation
    process and workers are not left to init; the node adopts them (it is their
    subreaper), the job finishes, and the node reaps the process once it ends."""
    marker, release = tmp_path / "started", tmp_path / "release"
    with running_node(tmp_path / "node", cpus=2) as node:
        node_process = psutil.Process(node.proc.pid)
        with JobCluster(mark_and_hold, nodes=[node.spec], secret=node.secret) as held:
            job = held.submit(str(marker), str(release))
            wait_until(marker.exists)
            computation = psutil.Process(int(marker.read_text())).parent()
            zygote = zygote_of(node)
            assert computation.ppid() == zygote.pid
            zygote.kill()
            wait_until(lambda: computation.ppid() == node.proc.pid)
            release.touch()
            job()
            assert job.status == DispyJob.Finished, job.exception
        # Ended with its cluster, and reaped by the node: not a zombie.
        wait_until(lambda: not psutil.pid_exists(computation.pid))
        assert not computation_processes(node_process)


def test_an_adopted_computation_ends_with_a_killed_node(tmp_path: Path) -> None:
    """After the zygote's death its computation process is the node's child; the
    node's own death (kill -9) still ends it and its workers."""
    marker = tmp_path / "marker"
    node = start_node(tmp_path / "node", cpus=2)
    try:
        cluster = JobCluster(_sleep_marked, nodes=[node.spec], secret=node.secret)
        try:
            cluster.submit(str(marker))
            wait_until(marker.exists)
            zygote = zygote_of(node)
            zygote.kill()
            wait_until(lambda: not psutil.pid_exists(zygote.pid))
            below = computation_processes(psutil.Process(node.proc.pid))
            assert len(below) >= 2
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(WAIT)
            _gone, alive = psutil.wait_procs(below, timeout=WAIT)
            assert alive == []
        finally:
            cluster.close(terminate=True)
    finally:
        node.stop()


def test_a_computation_in_its_setup_ends_with_a_killed_node(tmp_path: Path) -> None:
    """kill -9 of the node while a computation's setup runs: nothing reads the
    computation's control channel then, so its end was not seen; the process
    went on until its setup ended (here 60 s). Its parent's death ends it."""
    marker, release = tmp_path / "marker", tmp_path / "release"
    node = start_node(tmp_path / "node")
    failed: list[BaseException] = []

    def set_up() -> None:
        try:
            JobCluster(
                square,
                nodes=[node.spec],
                secret=node.secret,
                setup=functools.partial(_hold_setup, str(marker), str(release)),
            ).close()
        except Exception as exc:  # the node is gone: how is not this test's point
            failed.append(exc)

    setting_up = threading.Thread(target=set_up, daemon=True)
    setting_up.start()
    try:
        wait_until(marker.exists)
        computation = psutil.Process(int(marker.read_text()))
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(WAIT)
        _gone, alive = psutil.wait_procs([computation], timeout=WAIT)
        assert alive == []
    finally:
        release.touch()
        node.stop()
        setting_up.join(WAIT)
    assert failed, "the cluster was made on a killed node"


def _hold_setup(marker: str, release: str) -> int:
    """A setup that writes its pid to ``marker`` and waits (60 s at most) for
    ``release``."""
    import os
    import pathlib
    import time

    # Renamed into place: the test reads it once it exists.
    pathlib.Path(f"{marker}.tmp").write_text(str(os.getpid()))
    os.replace(f"{marker}.tmp", marker)
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return 0


def _sleep_marked(path: str) -> None:
    import pathlib
    import time

    pathlib.Path(path).write_text("started")
    time.sleep(60)


#: Run as a subreaper (as bench/run.py is): stop a node one way, then print the
#: descendants left behind (name, status) as JSON. A node that leaves its zygote
#: unreaped hands a zombie to this process, which is what the benchmark reports.
_REAPER = """
import ctypes, json, os, signal, sys, time
from pathlib import Path
import psutil
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
mode, directory, zygote = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

def children_named(pid):
    # The names of the node's children, once its zygote has its name (a zygote
    # just forked is still "python" for a moment, longer on a loaded machine).
    deadline = time.monotonic() + 10
    while True:
        names = [p.name() for p in psutil.Process(pid).children()]
        if zygote in names or time.monotonic() > deadline:
            return names
        time.sleep(0.01)
if mode == "local":
    from dispynb.local import LocalCluster
    cluster = LocalCluster(nodes=1, cpus=1)
    node_pid = cluster.pids[0]
    names = children_named(node_pid)
    cluster.close()
else:
    from tests.nodeproc import start_node
    node = start_node(directory)
    node_pid = node.proc.pid
    names = children_named(node_pid)
    if mode == "killpg":  # Ctrl-C in a terminal: SIGINT to the foreground group
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # (this driver is in it too)
        os.killpg(os.getpgid(node_pid), signal.SIGINT)
    else:
        node.proc.send_signal(getattr(signal, mode))
    node.proc.wait(20)
left = psutil.Process().children(recursive=True)
if mode == "SIGKILL":  # nobody can reap for a killed node: it must die anyway
    left = psutil.wait_procs(left, timeout=10)[1]
print(json.dumps({"before": names, "left": [(p.name(), p.status()) for p in left]}))
"""


@pytest.mark.parametrize("how", ["local", "SIGTERM", "SIGINT", "killpg", "SIGKILL"])
def test_no_zygote_is_left_after_the_node_stops(tmp_path: Path, how: str) -> None:
    import json
    import subprocess
    import sys

    from tests.nodeproc import node_env

    run = subprocess.run(
        [sys.executable, "-c", _REAPER, how, str(tmp_path / "node"), ZYGOTE_NAME],
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=50,
        start_new_session=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["before"] == [ZYGOTE_NAME]
    assert report["left"] == []


def _resume(zygote: psutil.Process) -> None:
    """Let a suspended zygote go on; under load the node may have killed it already
    (it did not answer in `ANSWER_TIMEOUT`), and then its computations start as new
    processes: what these tests check holds either way."""
    with contextlib.suppress(psutil.NoSuchProcess):
        zygote.resume()


async def _set_up_and_leave(
    node: CliNode, dest: Path, zygote: psutil.Process | None = None
) -> None:
    """Set a computation up on ``node`` and hang up once the node asked its zygote
    for the computation's process (its directory is made just before). With
    ``zygote``: close the computation first (its directory kept), then let the
    zygote go on and wait for the end of the setup before hanging up."""
    conn, _ = await connect(
        "127.0.0.1",
        node.port,
        secret=node.secret.encode(),
        max_message_size=1 << 24,
        name="leaver",
    )
    try:
        await _set_up(conn, node, dest, zygote)
    finally:
        conn.close()


async def _set_up(
    conn: Connection, node: CliNode, dest: Path, zygote: psutil.Process | None
) -> None:
    bundle = serialize.dumps({"func": square, "setup": None, "setup_args": ()})
    # Kept when closed (cleanup=False): else its process ends at once, unable to
    # enter it.
    cleanup = zygote is None
    setup = ComputationSetup(comp_id=1, name="left", workers=1, cleanup=cleanup)
    conn.write(setup, bundle)
    await conn.flush()
    deadline = time.monotonic() + WAIT
    while not any(path.is_dir() for path in dest.rglob("left-1")):
        assert time.monotonic() < deadline, "the node did not start the setup"
        await asyncio.sleep(0.01)
    if zygote is not None:
        conn.write(ComputationClose(comp_id=1, terminate=True))
        async with asyncio.timeout(WAIT):
            while not isinstance((await conn.recv())[0], ComputationClosed):
                pass
        _resume(zygote)
        # "computation left failed to start: ..." or "... of ... ready with ...".
        while "computation left " not in node.log_text():
            assert time.monotonic() < deadline, "the node did not end the setup"
            await asyncio.sleep(0.01)


def test_a_client_leaving_during_a_setup_costs_no_other_computation(
    tmp_path: Path,
) -> None:
    """A client goes away while the node waits for the zygote's answer (the zygote
    held up, as under load): that answer must not be taken as the next
    computation's process, or a later computation's close kills the next one's
    jobs ('the computation's process on the node died'), as it did in the shared
    scheduler's burst of setups. Nor print a traceback."""
    marker, release = tmp_path / "started", tmp_path / "release"
    with running_node(tmp_path / "node", cpus=2) as node:
        zygote = zygote_of(node)
        zygote.suspend()
        try:
            asyncio.run(_set_up_and_leave(node, tmp_path / "node" / "dest"))
            wait_until(lambda: "'leaver' from" in node.log_text())
        finally:
            _resume(zygote)
        with JobCluster(mark_and_hold, nodes=[node.spec], secret=node.secret) as held:
            job = held.submit(str(marker), str(release))
            wait_until(marker.exists)
            # Another computation comes and goes while that job runs.
            with JobCluster(square, nodes=[node.spec], secret=node.secret) as other:
                assert other.submit(3)() == 9
            release.touch()
            job()
            assert job.status == DispyJob.Finished, job.exception
        assert "no pids limit" not in node.log_text()
        # The left computation's directory was gone when its process, forked at
        # last, tried to enter it: it ends quietly, no traceback in the node's
        # output (a %dispy local node's reaches the notebook's cell).
        assert "Traceback" not in node.log_text(), node.log_text()


def test_a_computation_closed_while_its_process_is_made_leaves_none(
    tmp_path: Path,
) -> None:
    """A computation closed while the zygote makes its process (the zygote held
    up, as under load) must not leave that process and its workers running for
    the node's life once its client has gone."""
    with running_node(tmp_path / "node", cpus=2) as node:
        zygote = zygote_of(node)
        zygote.suspend()
        try:
            asyncio.run(_set_up_and_leave(node, tmp_path / "node" / "dest", zygote))
        finally:
            _resume(zygote)
        node_process = psutil.Process(node.proc.pid)
        wait_until(lambda: not computation_processes(node_process))
        assert "computation left of" not in node.log_text()  # never "ready"


def _pidfds() -> int:
    """This process's open pidfds."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
    return count


def test_a_process_whose_wait_was_cancelled_leaves_no_pidfd() -> None:
    """A computation's start is cancelled when its client leaves, maybe while it
    waits for its process (killed: closed during its setup). That process's pidfd
    was then never closed: a node fuzzed by one client (tests/fuzz/test_servers.py)
    held 4 of them after 21 sessions. It is closed once the process exits."""
    import subprocess
    import sys

    from nodeserver.zygote import ForkedProcess

    async def main() -> None:
        before = _pidfds()
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE,
        )
        assert child.stdin is not None
        try:
            process = ForkedProcess(child.pid)
            waiter = asyncio.ensure_future(process.wait())
            await asyncio.sleep(0.05)  # waiting for it
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            assert _pidfds() == before + 1  # still followed: a kill may come
            child.stdin.close()  # it exits
            async with asyncio.timeout(WAIT):
                while _pidfds() > before:
                    await asyncio.sleep(0.01)
        finally:
            child.kill()
            child.wait()
            child.stdin.close()

    asyncio.run(main())


def test_a_computation_whose_directory_goes_as_it_starts_ends_quietly(
    tmp_path: Path,
) -> None:
    """The node removes a computation's directory when its client leaves during the
    setup; removed just after the forked process went there, its ``getcwd``
    raised, and the process's traceback landed in the node's log (found by
    tests/fuzz/test_servers.py). It ends with status 1 and says nothing."""
    import socket
    import sys

    from nodeserver import zygote

    directory = tmp_path / "computation"
    directory.mkdir()
    stderr_read, stderr_write = os.pipe()
    sock, other = socket.socketpair()
    pipe = os.pipe()
    control = os.dup(other.fileno())
    pid = os.fork()
    if pid == 0:  # the computation process, as the zygote forks it
        os.dup2(stderr_write, 2)
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 (not pytest's capture)
        real_chdir = os.chdir

        def chdir_then_removed(path: str) -> None:
            real_chdir(path)
            os.rmdir(path)  # the node's close, just then

        os.chdir = chdir_then_removed  # type: ignore[assignment]
        zygote._become_computation(sock, pipe, control, str(directory), [])
    for fd in (stderr_write, control, *pipe):
        os.close(fd)
    sock.close()
    other.close()
    _, status = os.waitpid(pid, 0)
    with os.fdopen(stderr_read, "rb") as said:
        stderr = said.read().decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 1, stderr
    assert stderr == ""
