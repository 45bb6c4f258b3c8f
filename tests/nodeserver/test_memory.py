"""Node processes keep freed memory while they work and give it back once idle
(`nodeserver.memory`, `nodeserver.jobrunner.worker_loop`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dispynb import DispyJob, JobCluster
from nodeserver.memory import release_freed_memory
from nodeserver.zygote import ZYGOTE_NAME
from tests.jobs import computation_processes, square, wait_until
from tests.nodeproc import node_env, running_node
from tests.procmem import private_memory

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
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/<pid>/status")
@pytest.mark.parametrize("shared_memory", ["1", "0"], ids=["shm", "socket"])
def test_an_idle_node_gives_back_what_a_large_job_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_memory: str
) -> None:
    # Through shared memory (a client on this host) or the socket (the way a
    # remote client's arguments come): the node server keeps the message's body.
    monkeypatch.setenv("DISPYNB_SHARED_MEMORY", shared_memory)
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(measure, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        small = cluster.submit(b"x")
        assert small() == 1, small.exception
        server = psutil.Process(node.proc.pid)
        (worker,) = [
            proc
            for proc in computation_processes(server)
            if not proc.children()  # the worker, not the computation process
        ]
        before = {proc: private_memory(proc.pid) for proc in (server, worker)}
        job = cluster.submit(bytes(LARGE))
        assert job() == LARGE, job.exception
        assert job.status == DispyJob.Finished
        # They used to keep 24 MB or more each (freed heap, a message body kept for
        # the next large message) for as long as they lived.
        wait_until(
            lambda: all(
                private_memory(proc.pid) < held + 8 * MiB
                for proc, held in before.items()
            ),
            timeout=30,
        )


def _shared_objects(pid: int) -> set[str]:
    """The shared libraries (extension modules among them) process ``pid`` maps."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8") as maps:
            lines = maps.read().splitlines()
    except PermissionError:  # the node is not dumpable: root only
        pytest.skip(f"/proc/{pid}/maps of the node needs root (CAP_SYS_PTRACE)")
    fields = (line.split(maxsplit=5) for line in lines)
    return {os.path.basename(f[5]) for f in fields if len(f) == 6 and ".so" in f[5]}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/<pid>/maps")
def test_the_node_loads_no_extension_module_after_forking_its_zygote(
    tmp_path: Path,
) -> None:
    """What the node server imports once serving is not shared with its zygote, and
    its objects fill pools the two shared: the node copies those pages, the zygote
    keeps the originals. It imported the idna codec (``unicodedata``) and the
    event loop's executor threads (``_queue``) then: 0.8 MiB more of node and
    zygote USS at rest. Pure Python modules leave no mapping; these two do."""
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(square, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        jobs = [cluster.submit(n) for n in range(5)]
        assert [job() for job in jobs] == [n * n for n in range(5)]
        server = psutil.Process(node.proc.pid)
        (zygote,) = [p for p in server.children() if p.name() == ZYGOTE_NAME]
        later = _shared_objects(server.pid) - _shared_objects(zygote.pid)
    assert not later, later


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/<pid>/maps")
def test_a_node_on_linux_reports_its_resources_without_psutil(tmp_path: Path) -> None:
    """The node reports what it has free (dispy's avail_info) in its welcome and in
    every pulse: psutil read the four figures, and its ten modules and C extension
    took 0.8 MiB of every node's shared memory and 6 ms of CPU at each start. On
    Linux the node reads them from ``/proc`` itself."""
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(square, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        assert cluster.submit(3)() == 9
        (status,) = cluster.status().nodes
        assert status.avail_info is not None and status.avail_info.memory > 0
        server = psutil.Process(node.proc.pid)
        loaded = _shared_objects(server.pid)
    assert not [name for name in loaded if "psutil" in name], loaded


#: What the node imports before it forks its zygote (`nodeserver.zygote.start_zygote`);
#: ``runpy`` and ``importlib.util`` as ``python -m nodeserver`` imports them.
_BEFORE_THE_FORK = """
import importlib.util, json, runpy, sys
import nodeserver.cli
from nodeserver.zygote import start_zygote
zygote = start_zygote()
print(json.dumps(sorted(sys.modules)))
zygote.stop()
"""


def imported_before_the_fork() -> set[str]:
    """The modules a node has imported when it forks its zygote."""
    done = subprocess.run(
        [sys.executable, "-c", _BEFORE_THE_FORK],
        capture_output=True, text=True, timeout=60, check=True, env=node_env(),
    )  # fmt: skip
    return set(json.loads(done.stdout))


def test_a_node_without_a_config_file_shares_no_config_parser() -> None:
    """Every module the node imports before the zygote's fork is in the image that
    its five processes share: ``configparser`` was 0.2 MiB of it (and 1 ms of CPU
    at each start) for the ``--config`` files few nodes are given."""
    assert "configparser" not in imported_before_the_fork()


def test_a_node_shares_neither_the_notebook_displays_nor_the_build_tables() -> None:
    """The node said a size in a log line (``--clean``) with the notebook displays'
    helper (`dispynb.reprs`), which brought `html` and its entity tables and
    `dispynb.job`; the client's test of which functions travel by value read the
    install paths with `sysconfig`, and its build tables, at import. 0.7 MiB of the
    image a node's processes share, for nothing a node runs."""
    modules = imported_before_the_fork()
    assert not {"dispynb.reprs", "html", "sysconfig"} & modules


def imported_modules() -> list[str]:
    """A job: the modules its worker has."""
    import sys

    return sorted(sys.modules)


def test_a_computation_imports_no_module_after_the_zygotes_fork(
    tmp_path: Path,
) -> None:
    """Modules a computation process imported once forked (``multiprocessing``,
    which dispy's names give every computation) were its own, and their objects
    filled pools it shared with the zygote, whose pages it copied; the zygote did
    so for `dispynb.memscrub`: 1.2 MiB more PSS after W1 between them."""
    before = imported_before_the_fork()
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(imported_modules, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        job = cluster.submit()
        worker = job()
        assert worker is not None, job.exception
    assert sorted(set(worker) - before) == [], worker
