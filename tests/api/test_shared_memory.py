"""Large arguments to a node on the client's machine go through shared memory.

Real local node servers; the client's `shm.write_segment` is wrapped to learn the
names it creates, and each test checks that every one of them is gone afterwards:
after the jobs ran, after cancels, after the client was killed with SIGKILL.
"""

from __future__ import annotations

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
from tests.jobs import WAIT, wait_for_path, wait_until

pytestmark = pytest.mark.slow

MB = 1_000_000


@pytest.fixture
def created(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The shared memory names the client creates during the test."""
    names: list[str] = []
    write = shm.write_segment

    def recording(buffers: Any) -> tuple[str, bytes]:
        name, reference = write(buffers)
        names.append(name)
        return name, reference

    monkeypatch.setattr(shm, "write_segment", recording)
    yield names
    for name in names:
        shm.unlink(name)


def all_gone(names: list[str]) -> bool:
    return not any((shm.SHM_DIR / name).exists() for name in names)


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
    assert len(created) == 4  # the large ones only, one object each
    wait_until(lambda: all_gone(created))


def test_turned_off_by_the_environment_uses_the_socket(local, created, monkeypatch):
    monkeypatch.setenv("DISPYNB_SHARED_MEMORY", "0")
    payload = os.urandom(2 * MB)
    with JobCluster(digest, nodes=local) as cluster:
        assert cluster.submit(payload)() == digest(payload)
    assert created == []


def test_shared_memory_full_falls_back_to_the_socket(local, monkeypatch, caplog):
    def full(buffers: Any) -> tuple[str, bytes]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm, "write_segment", full)
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
            wait_until(lambda: all_gone(created))
        finally:
            cluster.close(terminate=True)
    assert not (tmp_path / "q").exists()


CLIENT = textwrap.dedent(
    """
    import os, sys, time
    from dispynb import JobCluster, LocalCluster
    from dispynb.protocol import shm

    write = shm.write_segment

    def recording(buffers):
        name, reference = write(buffers)
        print(name, flush=True)
        return name, reference

    shm.write_segment = recording

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
    names: list[str] = []
    nodes: list[psutil.Process] = []
    try:
        assert client.stdout is not None
        for line in client.stdout:
            if line.strip() == "ready":
                break
            names.append(line.strip())
        assert len(names) >= 2, names  # the running job and one sent ahead
        assert not all_gone(names)  # the queued jobs' objects are there
        nodes = psutil.Process(client.pid).children(recursive=True)
        client.send_signal(signal.SIGKILL)
        client.wait(WAIT)
        # The node sees its parent go, ends the session and unlinks what was left.
        wait_until(lambda: all_gone(names), timeout=30)
        psutil.wait_procs(nodes, timeout=30)
        assert not [p for p in nodes if p.is_running() and p.status() != "zombie"]
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        for proc in nodes:
            if proc.is_running():
                proc.kill()
        for name in names:
            shm.unlink(name)
        if client.stdout is not None:
            client.stdout.close()
    print(json.dumps(names))
