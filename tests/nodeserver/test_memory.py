"""Node processes keep freed memory while they work and give it back once idle
(`nodeserver.memory`, `nodeserver.jobrunner.worker_loop`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dispynb import DispyJob, JobCluster
from nodeserver.memory import release_freed_memory
from tests.jobs import computation_processes, wait_until
from tests.nodeproc import running_node

MiB = 1024 * 1024
#: The large argument: under glibc's mmap threshold as the node sets it (32 MB), so
#: it lives on the heap, where freed memory stays unless it is given back.
LARGE = 24 * MiB

_HELD_THEN_RELEASED = """
import ctypes, sys
from nodeserver.memory import keep_freed_memory, release_freed_memory

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096

keep_freed_memory()
base = rss()
block = ctypes.create_string_buffer(24 * 1024 * 1024)
ctypes.memset(block, 1, len(block))
del block
held = rss()
assert release_freed_memory()
print(base, held, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_kept_until_released() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _HELD_THEN_RELEASED],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    base, held, released = (int(word) for word in out.split())
    assert held - base > 20 * MiB  # kept for reuse: the next message needs no faults
    assert released - base < 4 * MiB  # given back


def test_release_freed_memory_is_harmless_to_call_again() -> None:
    assert release_freed_memory() == release_freed_memory()


def measure(data: bytes) -> int:
    """A job whose argument is large."""
    return len(data)


@pytest.mark.slow
def test_an_idle_worker_gives_back_what_a_large_job_freed(tmp_path: Path) -> None:
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(measure, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        small = cluster.submit(b"x")
        assert small() == 1, small.exception
        (worker,) = [
            proc
            for proc in computation_processes(psutil.Process(node.proc.pid))
            if not proc.children()  # the worker, not the computation process
        ]
        before = worker.memory_info().rss
        job = cluster.submit(bytes(LARGE))
        assert job() == LARGE, job.exception
        assert job.status == DispyJob.Finished
        # The worker unpickled 24 MB; idle, it returns them (it used to keep them
        # until its next job, whatever the next job's size).
        wait_until(lambda: worker.memory_info().rss < before + 8 * MiB)
