"""The computation process, for real: the test plays the node server.

Each test starts ``python -m nodeserver.compute`` on one end of a socket pair, loads a
computation made of functions defined in the test (so cloudpickle ships them by
value), and talks to the workers over the sockets they arrive with. The first section
tests `MessageSocket` on its own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import psutil
import pytest

from dispynb.errors import ConnectionClosedError, FramingError
from dispynb.jobenv import inject_names
from dispynb.protocol import serialize
from dispynb.protocol.framing import encode_frames
from dispynb.protocol.messages import FINISHED, RAISED, pack_header
from nodeserver.channel import MessageSocket
from nodeserver.ipc import (
    Done,
    Load,
    Loaded,
    LoadFailed,
    Run,
    Shutdown,
    Skip,
    WorkerExited,
    WorkerStarted,
)

TIMEOUT = 10

# --- the channel ---------------------------------------------------------------------


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    left, right = MessageSocket(a), MessageSocket(b)
    yield left, right
    left.close()
    right.close()


def test_channel_round_trip_keeps_buffers_apart(pair):
    left, right = pair
    left.send(Run(key=1, attempt=2), [b"abc", bytearray(b""), memoryview(b"xyz")])

    message, buffers = right.recv()

    assert message == Run(key=1, attempt=2)
    assert [bytes(b) for b in buffers] == [b"abc", b"", b"xyz"]
    assert all(isinstance(b, memoryview) for b in buffers)


def test_channel_poll_sees_whole_messages_only_and_keeps_them_in_order(pair):
    left, right = pair
    assert not right.poll()  # nothing there: no blocking
    data = b"".join(
        [
            _framed(Run(key=1, attempt=0)),
            _framed(Skip(key=1)),
            _framed(Run(key=2, attempt=0)),
        ]
    )
    left.sock.sendall(data[:-3])  # the last message is incomplete
    assert right.poll()
    assert right.recv()[0] == Run(key=1, attempt=0)
    assert right.poll()
    assert right.recv()[0] == Skip(key=1)
    assert not right.poll()
    left.sock.sendall(data[-3:])
    assert right.recv()[0] == Run(key=2, attempt=0)


def test_channel_poll_on_a_blocking_socket_never_blocks():
    a, b = socket.socketpair()  # as in a worker: blocking, no timeout
    left, right = MessageSocket(a), MessageSocket(b)
    try:
        assert not right.poll()
        left.send(Skip(key=3))
        deadline = time.monotonic() + TIMEOUT
        while not right.poll():
            assert time.monotonic() < deadline
        assert right.recv()[0] == Skip(key=3)
        assert not right.poll()
    finally:
        left.close()
        right.close()


def _framed(message) -> bytes:
    head, parts = encode_frames([pack_header(message.to_header())])
    return b"".join([head, *parts])


def test_channel_large_and_many_buffers_survive_partial_sends(pair):
    """A socket with a timeout is non-blocking inside: sendmsg returns short counts."""
    left, right = pair
    big = os.urandom(8 * 1024 * 1024)
    many = [bytes([i % 256]) * (i % 7) for i in range(3000)]  # more than IOV_MAX
    received = []
    reader = threading.Thread(
        target=lambda: received.extend(right.recv() for _ in range(2))
    )
    reader.start()
    left.send(Run(key=1, attempt=0), [big, b"tail"])
    left.send(Run(key=2, attempt=0), many)
    reader.join(TIMEOUT)

    assert not reader.is_alive()
    (_, first), (second_message, second) = received
    assert [bytes(b) for b in first] == [big, b"tail"]
    assert second_message.key == 2
    assert [bytes(b) for b in second] == many


def test_channel_passes_file_descriptors(pair):
    left, right = pair
    read_end, write_end = os.pipe()
    try:
        left.send(WorkerStarted(pid=123), fds=[write_end])
        left.send(Loaded(pid=1))
        message, buffers, fds = right.recv_with_fds()
        plain, _, none = right.recv_with_fds()
    finally:
        os.close(write_end)
    try:
        assert message == WorkerStarted(pid=123)
        assert (buffers, none, plain) == ([], [], Loaded(pid=1))
        assert len(fds) == 1
        os.write(fds[0], b"through")
        assert os.read(read_end, 16) == b"through"
    finally:
        os.close(read_end)
        for fd in fds:
            os.close(fd)


def test_channel_refuses_oversized_message_before_allocating():
    a, b = socket.socketpair()
    sender, receiver = MessageSocket(a), MessageSocket(b, max_size=1000)
    b.settimeout(TIMEOUT)
    try:
        sender.send(Run(key=1, attempt=0), [bytes(2000)])
        with pytest.raises(FramingError, match="over the 1000-byte cap"):
            receiver.recv()
    finally:
        sender.close()
        receiver.close()


def test_channel_eof_raises_connection_closed(pair):
    left, right = pair
    left.sock.sendall(b"\x00\x00\x00\x10")  # half a prefix, then EOF
    left.close()

    with pytest.raises(ConnectionClosedError, match="after 4 of 8 bytes"):
        right.recv()
    with pytest.raises(ConnectionClosedError):
        right.recv_with_fds()


def test_channel_send_to_closed_peer_raises_connection_closed(pair):
    left, right = pair
    right.close()

    with pytest.raises(ConnectionClosedError):
        left.send(Run(key=1, attempt=0))


def test_inject_names_never_overwrites_user_names():
    namespace = {"os": "mine"}
    exec("def f(): pass\ndef g(): pass", namespace)

    inject_names([namespace["f"], namespace["g"], None, len], {"os": os, "x": 1})

    assert namespace["os"] == "mine"
    assert namespace["x"] == 1


# --- the computation process -----------------------------------------------------


class FakeNodeServer:
    """The node server's side of one computation process."""

    def __init__(self, tmp_path: Path, index: int) -> None:
        self.job_path = tmp_path / f"job{index}"
        self.job_path.mkdir()
        self.stderr_path = tmp_path / f"stderr{index}.txt"
        ours, theirs = socket.socketpair()
        ours.settimeout(TIMEOUT)
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "nodeserver.compute",
                    "--control-fd",
                    str(theirs.fileno()),
                ],
                pass_fds=[theirs.fileno()],
                cwd=self.job_path,
                stderr=stderr,
            )
        theirs.close()
        self.control = MessageSocket(ours)
        self.workers: dict[int, MessageSocket] = {}
        self.seen_pids: set[int] = set()

    def load(self, bundle: dict, workers: int = 2) -> None:
        load = Load(
            name="comp",
            workers=workers,
            node_name="node-a",
            node_address="127.0.0.1",
            job_path=str(self.job_path),
        )
        self.control.send(load, serialize.dumps(bundle))

    def recv(self):
        message, buffers, fds = self.control.recv_with_fds()
        assert buffers == []
        if isinstance(message, WorkerStarted):
            assert message.pidfd and len(fds) == 2
            # The pidfd the node signals the worker through is that worker's.
            with open(f"/proc/self/fdinfo/{fds[1]}") as handle:
                assert f"Pid:\t{message.pid}\n" in handle.read()
            os.close(fds[1])
            sock = socket.socket(fileno=fds[0])
            sock.settimeout(TIMEOUT)
            self.workers[message.pid] = MessageSocket(sock)
            self.seen_pids.add(message.pid)
        else:
            assert fds == []
        return message

    def expect(self, kind):
        message = self.recv()
        assert isinstance(message, kind), message
        return message

    def start(self, bundle: dict, workers: int = 2) -> list[int]:
        """Load ``bundle``; the pids of the workers, after `Loaded`."""
        self.load(bundle, workers)
        loaded = self.expect(Loaded)
        assert loaded.pid == self.proc.pid
        return [self.expect(WorkerStarted).pid for _ in range(workers)]

    def run(self, pid: int, *args, key: int = 0) -> Done:
        worker = self.workers[pid]
        worker.send(Run(key=key, attempt=0), serialize.dumps((args, {})))
        done, buffers = worker.recv()
        assert (done.key, done.attempt) == (key, 0)
        if done.outcome == FINISHED:
            return serialize.loads(buffers)
        return done

    def expect_exit_and_replacement(self, pid: int) -> tuple[int, int]:
        """(returncode, new pid) after worker ``pid`` died."""
        worker = self.workers.pop(pid)
        with pytest.raises(ConnectionClosedError):
            worker.recv()
        worker.close()
        exited = self.expect(WorkerExited)
        assert exited.pid == pid
        return exited.returncode, self.expect(WorkerStarted).pid

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def destroy(self) -> None:
        self.control.close()
        for worker in self.workers.values():
            worker.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        for pid in self.seen_pids:  # orphans, if the test failed half-way
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)


def is_alive(pid: int) -> bool:
    """True if ``pid`` is still one of our computation processes, not a zombie."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and any(
            "nodeserver.compute" in part for part in process.cmdline()
        )
    except psutil.Error:
        return False


def wait_gone(pids, timeout: float = TIMEOUT) -> None:
    """Wait for processes that are not our children (no waitpid possible)."""
    deadline = time.monotonic() + timeout
    while any(is_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still alive: {pids}"
        time.sleep(0.02)


@pytest.fixture
def node(tmp_path):
    made: list[FakeNodeServer] = []

    def make() -> FakeNodeServer:
        server = FakeNodeServer(tmp_path, len(made))
        made.append(server)
        return server

    yield make
    for server in made:
        server.destroy()


def make_job():
    """A job doing what its first argument says (a closure: shipped by value)."""

    def job(action="pid", arg=None):
        if action == "echo":
            return arg
        if action == "exit":
            os._exit(arg)
        if action == "segfault":
            import ctypes
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
            ctypes.string_at(0)
        if action == "ignore-sigterm":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if action == "raise":
            raise ValueError(arg)
        return os.getpid()

    return job


def test_compute_runs_jobs_in_workers_with_dispy_names(node):
    def job(x):
        print("job", x)
        names = (dispy_node_name, dispy_node_ip_addr, dispy_job_path)  # noqa: F821
        digest = hashlib.sha1(b"x").hexdigest()  # noqa: F821 (injected module)
        return x, os.getpid(), os.getcwd(), names, digest, platform.system()  # noqa: F821

    server = node()
    pids = server.start({"func": job}, workers=2)

    assert len(set(pids)) == 2
    assert server.proc.pid not in pids
    for key, pid in enumerate(pids * 3):
        server.workers[pid].send(Run(key=key, attempt=1), serialize.dumps(((key,), {})))
        done, buffers = server.workers[pid].recv()
        assert (done.key, done.attempt, done.outcome) == (key, 1, FINISHED)
        assert done.stdout == f"job {key}\n"
        x, job_pid, cwd, names, digest, system = serialize.loads(buffers)
        assert (x, job_pid, cwd) == (key, pid, str(server.job_path))
        assert names == ("node-a", "127.0.0.1", str(server.job_path))
        assert digest == "11f6ad8ec52a2984abaafd7c3b516503785c2072"
        assert system == "Linux"


def test_compute_job_exception_is_reported_and_worker_survives(node):
    server = node()
    [pid] = server.start({"func": make_job()}, workers=1)

    done = server.run(pid, "raise", "bad")

    assert done.outcome == RAISED
    assert "ValueError: bad" in done.exception
    assert server.run(pid, "echo", 5) == 5


def test_compute_setup_globals_and_shared_values_reach_jobs(node):
    def setup(start):
        global table, counter
        table = {"answer": start}
        counter = multiprocessing.Value("i", 0)  # noqa: F821 (injected module)
        return 0

    def job():
        with counter.get_lock():
            counter.value += 1
            return table["answer"], counter.value

    server = node()
    pids = server.start({"func": job, "setup": setup, "setup_args": (42,)})

    results = [server.run(pid) for pid in pids * 2]

    assert [answer for answer, _ in results] == [42] * 4
    assert [count for _, count in results] == [1, 2, 3, 4]  # one Value, shared


def test_compute_worker_exit_is_reported_and_replaced(node):
    server = node()
    [pid] = server.start({"func": make_job()}, workers=1)
    server.workers[pid].send(Run(key=1, attempt=0), serialize.dumps((("exit", 3), {})))

    returncode, new_pid = server.expect_exit_and_replacement(pid)

    assert returncode == 3
    assert new_pid != pid
    assert server.run(new_pid, "echo", "again") == "again"


def test_compute_worker_segfault_is_reported_as_signal(node):
    server = node()
    [pid] = server.start({"func": make_job()}, workers=1)
    server.workers[pid].send(
        Run(key=1, attempt=0), serialize.dumps((("segfault",), {}))
    )

    returncode, new_pid = server.expect_exit_and_replacement(pid)

    assert returncode == -signal.SIGSEGV
    assert server.run(new_pid, "echo", 1) == 1


def test_compute_killed_worker_is_replaced(node):
    server = node()
    pids = server.start({"func": make_job()}, workers=2)

    os.kill(pids[0], signal.SIGKILL)
    returncode, new_pid = server.expect_exit_and_replacement(pids[0])

    assert returncode == -signal.SIGKILL
    assert not is_alive(pids[0])
    assert server.run(new_pid) == new_pid
    assert server.run(pids[1]) == pids[1]


def test_compute_setup_exception_fails_the_load(node):
    def setup():
        raise ValueError("bad")

    server = node()
    server.load({"func": make_job(), "setup": setup})

    failed = server.expect(LoadFailed)
    assert failed.message == "setup raised ValueError: bad"
    assert "in setup" in failed.traceback
    assert "ValueError: bad" in failed.traceback
    assert server.proc.wait(TIMEOUT) == 1


def test_compute_setup_bad_return_code_fails_the_load(node):
    server = node()
    server.load({"func": make_job(), "setup": lambda: 5})

    failed = server.expect(LoadFailed)
    assert failed.message.startswith("setup returned 5")
    assert server.proc.wait(TIMEOUT) == 1


def test_compute_unloadable_bundle_names_the_missing_module(node, monkeypatch):
    module = types.ModuleType("module_only_on_client")
    exec("def func(): pass", module.__dict__)
    module.func.__module__ = module.__name__
    monkeypatch.setitem(sys.modules, module.__name__, module)
    server = node()
    server.load({"func": module.func})  # pickled by reference: not on the node

    failed = server.expect(LoadFailed)
    assert "ModuleNotFoundError" in failed.message
    assert "module_only_on_client" in failed.message
    # The error alone: the unpickler's frames (dispynb's, cloudpickle's) are not
    # the user's, and the message already says to send the module with depends.
    assert (
        failed.traceback
        == "ModuleNotFoundError: No module named 'module_only_on_client'\n"
    )
    assert server.proc.wait(TIMEOUT) == 1


def test_compute_shutdown_stops_workers_and_runs_cleanup(node):
    def cleanup(name):
        with open("cleaned.txt", "w") as f:
            f.write(f"{name} on {dispy_node_name}")  # noqa: F821 (injected)

    server = node()
    bundle = {"func": make_job(), "cleanup": cleanup, "setup_args": ("done",)}
    pids = server.start(bundle, workers=3)
    assert server.run(pids[0]) == pids[0]

    server.control.send(Shutdown())
    exited = {server.expect(WorkerExited) for _ in pids}

    assert {(e.pid, e.returncode) for e in exited} == {
        (pid, -signal.SIGTERM) for pid in pids
    }
    with pytest.raises(ConnectionClosedError):
        server.recv()
    assert server.proc.wait(TIMEOUT) == 0
    assert (server.job_path / "cleaned.txt").read_text() == "done on node-a"
    assert not any(is_alive(pid) for pid in pids)


def test_compute_shutdown_kills_workers_that_ignore_sigterm(node):
    server = node()
    [pid] = server.start({"func": make_job()}, workers=1)
    server.run(pid, "ignore-sigterm")

    server.control.send(Shutdown())

    exited = server.expect(WorkerExited)
    assert (exited.pid, exited.returncode) == (pid, -signal.SIGKILL)
    assert server.proc.wait(TIMEOUT) == 0


def test_compute_failing_cleanup_is_logged_and_exit_is_clean(node):
    def cleanup():
        raise RuntimeError("cleanup broke")

    server = node()
    server.start({"func": make_job(), "cleanup": cleanup}, workers=1)

    server.control.send(Shutdown())
    server.expect(WorkerExited)

    assert server.proc.wait(TIMEOUT) == 0
    stderr = server.stderr()
    assert "cleanup of computation 'comp' failed" in stderr
    assert "RuntimeError: cleanup broke" in stderr


def test_compute_sigterm_shuts_down_like_shutdown(node):
    def cleanup():
        open("cleaned.txt", "w").close()

    server = node()
    pids = server.start({"func": make_job(), "cleanup": cleanup}, workers=2)

    server.proc.send_signal(signal.SIGTERM)

    assert {server.expect(WorkerExited).pid for _ in pids} == set(pids)
    assert server.proc.wait(TIMEOUT) == 0
    assert (server.job_path / "cleaned.txt").exists()


def test_compute_control_eof_kills_workers_and_exits(node):
    server = node()
    pids = server.start({"func": make_job()}, workers=2)
    assert server.run(pids[0]) == pids[0]

    server.control.close()

    assert server.proc.wait(TIMEOUT) == 1
    assert not any(is_alive(pid) for pid in pids)
    for pid in pids:
        with pytest.raises(ConnectionClosedError):
            server.workers[pid].recv()


def test_compute_killed_process_takes_its_workers_along(node):
    server = node()
    pids = server.start({"func": make_job()}, workers=2)

    server.proc.kill()
    server.proc.wait(TIMEOUT)

    wait_gone(pids)  # PR_SET_PDEATHSIG
    for pid in pids:
        with pytest.raises(ConnectionClosedError):
            server.workers[pid].recv()


def test_compute_unpicklable_result_keeps_the_worker(node):
    def job(kind):
        return threading.Lock() if kind == "lock" else kind

    server = node()
    [pid] = server.start({"func": job}, workers=1)

    done = server.run(pid, "lock")

    assert done.outcome == RAISED
    assert "result of type 'lock' cannot be pickled" in done.exception
    assert server.run(pid, "fine") == "fine"


def test_compute_shutdown_read_ahead_with_load_is_not_missed(node):
    # Load and Shutdown arrive together: one recv reads both, and the selector never
    # sees Shutdown on the socket. The process must still stop at once (it used to
    # wait for the node's SIGKILL, 10 s later): without its setup, closed before it
    # began (or, read apart, during or after it).
    server = node()
    server.load({"func": make_job()}, workers=1)
    server.control.send(Shutdown())
    assert server.proc.wait(TIMEOUT) == 0


def test_each_side_of_a_computation_has_its_own_class_name():
    """The computation process's class and the node server's are told apart by name
    (both were ``Computation``), so a traceback or a log says which side it is."""
    import nodeserver.computation as computation
    import nodeserver.compute as compute

    assert not hasattr(compute, "Computation")
    assert compute.ComputationProcess.__module__ == "nodeserver.compute"
    assert computation.Computation.__module__ == "nodeserver.computation"
