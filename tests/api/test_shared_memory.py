"""Large arguments to a node on the client's machine go through shared memory.

Real local node servers; the client's `SegmentPool.write` is wrapped to learn the
objects it uses (their inodes: a pooled object is renamed for every job), and each
test checks that every one of them is gone afterwards: after the cluster closed,
after cancels, after the client was killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from dispynb import DispyJob, JobCluster
from dispynb.protocol import shm
from dispynb.protocol.shmpool import SegmentPool
from tests.jobs import WAIT, wait_for_path, wait_until
from tests.nodeproc import running_node
from tests.shmtools import OpenWatch, live_inodes
from tests.sigint import main_waits_in_function, sigint_when

pytestmark = pytest.mark.slow

MB = 1_000_000


@pytest.fixture
def created(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    """(name, inode) of every shared memory object the client writes in the test."""
    used: list[tuple[str, int]] = []
    write = SegmentPool.write

    def recording(self: SegmentPool, buffers: Any) -> tuple[str, bytes]:
        name, reference = write(self, buffers)
        used.append((name, (shm.SHM_DIR / name).stat().st_ino))
        return name, reference

    monkeypatch.setattr(SegmentPool, "write", recording)
    yield used


def all_gone(used: list[tuple[str, int]]) -> bool:
    """No object the client used is left, under any name."""
    return not {number for _name, number in used} & live_inodes()


def digest(data: bytes, scale: int = 1) -> tuple[int, str]:
    return len(data) * scale, hashlib.sha256(data).hexdigest()


def mark_sleep(marker: str, seconds: float, data: bytes) -> int:
    import os
    import time

    with open(marker + ".tmp", "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(marker + ".tmp", marker)
    time.sleep(seconds)
    return len(data)


def test_large_arguments_round_trip_and_leave_nothing(local, created):
    payloads = [os.urandom(2 * MB) for _ in range(4)]
    with JobCluster(digest, nodes=local) as cluster:
        small = cluster.submit(b"tiny")
        jobs = [cluster.submit(p, scale=1) for p in payloads]
        assert small() == digest(b"tiny")
        assert [job() for job in jobs] == [digest(p) for p in payloads]
        assert {job.status for job in jobs} == {DispyJob.Finished}
    assert len(created) == 4  # the large ones only
    wait_until(lambda: all_gone(created))  # freed at close


def test_the_objects_of_finished_jobs_are_reused(local, created):
    payloads = [os.urandom(2 * MB) for _ in range(12)]
    with JobCluster(digest, nodes=local) as cluster:
        jobs = [cluster.submit(p) for p in payloads]
        assert [job() for job in jobs] == [digest(p) for p in payloads]
    assert len(created) == 12
    # At most two jobs per CPU hold an object: the others reuse theirs.
    assert len({number for _name, number in created}) <= 4
    assert len({name for name, _number in created}) == 12  # a new name every time
    wait_until(lambda: all_gone(created))


def test_turned_off_by_the_environment_uses_the_socket(local, created, monkeypatch):
    monkeypatch.setenv("DISPYNB_SHARED_MEMORY", "0")
    payload = os.urandom(2 * MB)
    with JobCluster(digest, nodes=local) as cluster:
        assert cluster.submit(payload)() == digest(payload)
    assert created == []


def test_shared_memory_full_falls_back_to_the_socket(local, monkeypatch, caplog):
    def full(self: SegmentPool, buffers: Any) -> tuple[str, bytes]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SegmentPool, "write", full)
    payloads = [os.urandom(2 * MB) for _ in range(3)]
    with JobCluster(digest, nodes=local) as cluster:
        jobs = [cluster.submit(p) for p in payloads]
        assert [job() for job in jobs] == [digest(p) for p in payloads]
    warnings = [r for r in caplog.records if "shared memory" in r.getMessage()]
    assert len(warnings) == 1  # once: the node's later jobs go over the socket
    assert "No space left on device" in warnings[0].getMessage()


def test_cancelled_jobs_leave_nothing(local1, created, tmp_path):
    with JobCluster(mark_sleep, nodes=local1) as cluster:
        try:
            long = cluster.submit(str(tmp_path / "long"), 60, os.urandom(2 * MB))
            wait_for_path(tmp_path / "long")
            queued = cluster.submit(str(tmp_path / "q"), 0, os.urandom(2 * MB))
            wait_until(lambda: len(created) == 2)  # sent to the node
            assert cluster.cancel(queued) == 0
            assert queued.wait(timeout=WAIT)
            assert queued.status == DispyJob.Cancelled
            assert cluster.cancel(long) == 0
            assert long.wait(timeout=WAIT)
            assert long.status in (DispyJob.Cancelled, DispyJob.Terminated)
        finally:
            cluster.close(terminate=True)
    wait_until(lambda: all_gone(created))
    assert not (tmp_path / "q").exists()


def test_a_ctrl_c_while_close_waits_for_the_nodes_leaves_nothing(created, tmp_path):
    """Ctrl-C while close() waits for a node's acknowledgement (the node stopped):
    close() raises KeyboardInterrupt and the pool's objects are still unlinked.
    Before, the close was cancelled before its clean-up: they stayed in /dev/shm
    for the rest of the process (a notebook's kernel), and beyond it until
    another client's sweep."""
    with running_node(tmp_path / "node") as node:
        cluster = JobCluster(digest, nodes=[node.spec], secret=node.secret)
        payload = os.urandom(2 * MB)
        assert cluster.submit(payload)() == digest(payload)
        assert len(created) == 1 and not all_gone(created)  # kept for reuse
        os.kill(node.proc.pid, signal.SIGSTOP)
        try:
            closing = main_waits_in_function("close", "dispynb.backends.nodes")
            with pytest.raises(KeyboardInterrupt), sigint_when(closing):
                cluster.close()
        finally:
            os.kill(node.proc.pid, signal.SIGCONT)
        wait_until(lambda: all_gone(created))


CLIENT = textwrap.dedent(
    """
    import os, sys, time
    from dispynb import JobCluster, LocalCluster
    from dispynb.protocol import shm
    from dispynb.protocol.shmpool import SegmentPool

    write = SegmentPool.write

    def recording(self, buffers):
        name, reference = write(self, buffers)
        print(name, os.stat(shm.SHM_DIR / name).st_ino, flush=True)
        return name, reference

    SegmentPool.write = recording

    def mark_sleep(marker, seconds, data):
        import os, time
        with open(marker, "w") as handle:
            handle.write(str(os.getpid()))
        time.sleep(seconds)
        return len(data)

    marker = sys.argv[1]
    local = LocalCluster(cpus=1)
    cluster = JobCluster(mark_sleep, nodes=local)
    jobs = [cluster.submit(marker, 60, os.urandom(2_000_000))]
    for n in range(3):
        jobs.append(cluster.submit(marker + str(n), 60, os.urandom(2_000_000)))
    while not os.path.exists(marker):
        time.sleep(0.01)
    print("ready", flush=True)
    time.sleep(120)
    """
)


def test_client_killed_with_sigkill_leaves_nothing(tmp_path):
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    client = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "long")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )
    used: list[tuple[str, int]] = []
    nodes: list[psutil.Process] = []
    try:
        assert client.stdout is not None
        for line in client.stdout:
            if line.strip() == "ready":
                break
            name, number = line.split()
            used.append((name, int(number)))
        assert len(used) >= 2, used  # the running job and one sent ahead
        assert not all_gone(used)  # the queued jobs' objects are there
        nodes = psutil.Process(client.pid).children(recursive=True)
        client.send_signal(signal.SIGKILL)
        client.wait(WAIT)
        # The node sees its parent go, ends the session and sweeps what was left.
        wait_until(lambda: all_gone(used), timeout=30)
        psutil.wait_procs(nodes, timeout=30)
        assert not [p for p in nodes if p.is_running() and p.status() != "zombie"]
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        for proc in nodes:
            if proc.is_running():
                proc.kill()
        for name, _number in used:
            shm.unlink(name)
        if client.stdout is not None:
            client.stdout.close()
    print(json.dumps(used))


def test_an_unauthenticated_peer_cannot_have_a_segment_opened(tmp_path):
    """A job-submit naming a live segment, before authentication or after a wrong
    secret, is refused: no process of the node opens the object (fanotify reports
    every open of it, with the opener's pid)."""
    from dispynb.protocol import serialize
    from dispynb.protocol.framing import encode_frames
    from dispynb.protocol.handshake import ClientHandshake
    from dispynb.protocol.messages import Error, JobSubmit, pack_header
    from tests.hostile.tools import (
        attacker_socket,
        limited_node,
        recv_unsigned,
        send_unsigned,
    )

    def refusal(sock: Any) -> Any:
        """Error, or "closed" if the node hung up without a word."""
        try:
            return type(recv_unsigned(sock))
        except ConnectionError:
            return "closed"

    pool = SegmentPool()
    try:
        name, reference = pool.write(serialize.dumps(((os.urandom(2 * MB),), {})))
        path = shm.SHM_DIR / name
        submit = JobSubmit(comp_id=1, jobs=[[1, 0, 1]])
        head, parts = encode_frames([pack_header(submit.to_header()), reference])
        message = b"".join([head, *parts])
        replies = []
        with (
            OpenWatch(path) as watch,
            limited_node(tmp_path / "node", cpus=1) as node,
        ):
            with attacker_socket(node.port, source="127.0.0.1") as sock:
                sock.sendall(message)  # instead of a hello
                replies.append(refusal(sock))
            with attacker_socket(node.port, source="127.0.0.1") as sock:
                handshake = ClientHandshake(b"not the node's secret")
                send_unsigned(sock, handshake.hello())
                send_unsigned(sock, handshake.on_challenge(recv_unsigned(sock)))
                replies.append(refusal(sock))
                with contextlib.suppress(OSError):
                    sock.sendall(message)
            server = psutil.Process(node.proc.pid)
            node_pids = {server.pid} | {p.pid for p in server.children(recursive=True)}
            node.stop()  # every process of the node is gone: nothing opens it later
            # Other processes may open it: dispynb clients elsewhere on this machine
            # sweeping /dev/shm for dead clients' objects. Never the node.
            assert not node_pids & set(watch.openers()), (node_pids, watch.openers())
            assert all(reply in ("closed", Error) for reply in replies), replies
            # The check can fail: an open is seen, with who opened.
            seen = len(watch.openers())
            shm.load_reference(reference, serialize.loads)
            assert os.getpid() in watch.openers()[seen:]
    finally:
        pool.close()


def doubled(data: bytes) -> bytes:
    return data + data


def results_in_memory() -> set[str]:
    return {p.name for p in shm.SHM_DIR.glob("dnr-*")}


def client_received(cluster: JobCluster) -> int:
    """Bytes the client received from its nodes (``DispyNode.rx``, counted on the
    connections as of each node's last job done): over a Unix socket for a
    LocalCluster's node, where no TCP counter sees them."""
    return sum(node.rx for node in cluster.status().nodes)


def test_large_results_come_back_through_shared_memory(local):
    before = results_in_memory()
    payloads = [os.urandom(2 * MB) for _ in range(6)]
    with JobCluster(doubled, nodes=local) as cluster:
        assert cluster.submit(b"ab")() == b"abab"  # set up; small: the socket
        received = client_received(cluster)
        jobs = [cluster.submit(p) for p in payloads]
        assert [job() for job in jobs] == [p + p for p in payloads]
        # 24 MB of results, but only references crossed the connection.
        assert client_received(cluster) - received < 1 * MB
        assert not results_in_memory() - before  # each freed as it was read


def test_large_results_over_the_socket_when_turned_off(local, monkeypatch):
    monkeypatch.setenv("DISPYNB_SHARED_MEMORY", "0")
    payload = os.urandom(2 * MB)
    with JobCluster(doubled, nodes=local) as cluster:
        assert cluster.submit(b"ab")() == b"abab"
        received = client_received(cluster)
        assert cluster.submit(payload)() == payload + payload
        assert client_received(cluster) - received >= 4 * MB


STOPPED_CLIENT = textwrap.dedent(
    """
    import os, sys, time
    from dispynb import JobCluster, LocalCluster

    def wait_then_double(marker, go, data):
        import os, time
        with open(marker, "w") as handle:
            handle.write(str(os.getpid()))
        while not os.path.exists(go):
            time.sleep(0.01)
        return data + data

    marker, go = sys.argv[1], sys.argv[2]
    local = LocalCluster(cpus=1)
    cluster = JobCluster(wait_then_double, nodes=local)
    job = cluster.submit(marker, go, os.urandom(2_000_000))
    while not os.path.exists(marker):
        time.sleep(0.01)
    print("ready", flush=True)
    time.sleep(120)
    """
)


def test_a_result_never_collected_is_freed_when_the_client_dies(tmp_path):
    """The client is stopped (SIGSTOP) when its job's result lands in shared memory,
    then killed: the node unlinks the result when the session ends."""
    script = tmp_path / "client.py"
    script.write_text(STOPPED_CLIENT)
    before = results_in_memory()
    client = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "started"), str(tmp_path / "go")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )
    nodes: list[psutil.Process] = []
    written: set[str] = set()
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "ready"
        nodes = psutil.Process(client.pid).children(recursive=True)
        client.send_signal(signal.SIGSTOP)
        (tmp_path / "go").write_text("")
        wait_until(lambda: bool(results_in_memory() - before), timeout=30)
        written = results_in_memory() - before
        client.send_signal(signal.SIGKILL)
        client.wait(WAIT)
        wait_until(lambda: not written & results_in_memory(), timeout=30)
        psutil.wait_procs(nodes, timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        for proc in nodes:
            if proc.is_running():
                proc.kill()
        for name in written:
            shm.unlink(name)
        if client.stdout is not None:
            client.stdout.close()


RECOVERING_CLIENT = """
import sys, time
import dispynb as dispy

def big(n, marks, data):
    import os, time
    open(os.path.join(marks, str(n)), "w").close()  # the node has the job
    go = os.path.join(marks, "go")  # made once the node saw its client gone
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return data * 2

cluster = dispy.JobCluster(big, nodes=[sys.argv[1]], secret=sys.argv[2],
                           recover_file=sys.argv[3])
payload = bytes(range(256)) * 8000  # 2 MB: through shared memory, both ways
jobs = [cluster.submit_job_id(n, n, sys.argv[4], payload) for n in range(2)]
print("submitted", flush=True)
time.sleep(60)  # killed before it gets further
"""

RECOVER_DIGESTS = """
import hashlib, json, sys
import dispynb as dispy
jobs = dispy.recover_jobs(sys.argv[1], timeout=30, secret=sys.argv[2])
print(json.dumps([[j.id, int(j.status), hashlib.sha256(j.result).hexdigest()]
                  for j in jobs]))
"""


def test_a_large_result_kept_for_recovery_holds_its_bytes(tmp_path):
    """A node keeps the results of a killed client for `recover_jobs`: a result its
    worker wrote to shared memory is kept as bytes, not as a reference."""
    from tests.api.crashclient import killed_after, start_client
    from tests.nodeproc import running_node

    (tmp_path / "recover.py").write_text(RECOVER_DIGESTS)
    marks = tmp_path / "marks"
    marks.mkdir()
    journal = tmp_path / "journal.db"
    before = results_in_memory()
    with running_node(tmp_path / "node", cpus=2) as node:
        args = (node.spec, node.secret, str(journal), str(marks))
        env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
        with killed_after(start_client(tmp_path, RECOVERING_CLIENT, *args, env=env)):
            wait_until(lambda: len(list(marks.iterdir())) == 2)
        # Its jobs end once the node keeps their results for nobody (they slept
        # a second: a node slower than that to see the client go sent them on).
        wait_until(lambda: "gone: its jobs go on" in node.log_text())
        (marks / "go").touch()
        done = subprocess.run(
            [sys.executable, "recover.py", str(journal), node.secret],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path.cwd())},
        )
        assert done.returncode == 0, done.stderr
    expected = hashlib.sha256(bytes(range(256)) * 16000).hexdigest()
    assert json.loads(done.stdout) == [[n, DispyJob.Finished, expected] for n in (0, 1)]
    wait_until(lambda: not results_in_memory() - before)  # nothing left behind


def _length(data: bytes) -> int:
    return len(data)


def test_a_node_in_another_pid_namespace_gets_arguments_over_its_socket(tmp_path):
    """A node in a container sharing the host's network (its own pid namespace and
    /dev/shm: ``docker run --network host``): the pid it reports named another
    process on the client's side, which passed for the node, so its jobs' large
    arguments went into shared memory it cannot see and every such job failed
    ("cannot open the job's shared memory"). They go over its socket."""
    import shutil

    from tests.nodeproc import start_node

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for pid and mount namespaces")
    container = [
        "unshare", "-p", "-f", "-m", "--mount-proc", "--kill-child",
        "sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh",
    ]  # fmt: skip
    node = start_node(tmp_path / "node", launcher=container)
    try:
        with JobCluster(_length, nodes=[node.spec], secret=node.secret) as cluster:
            job = cluster.submit(b"x" * (4 * shm.MIN_SIZE))
            result = job()
            assert result == 4 * shm.MIN_SIZE, job.exception
    finally:
        node.proc.kill()  # unshare --kill-child: the node with it
        node.proc.wait()
