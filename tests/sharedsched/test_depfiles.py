"""The files clients send with ``depends`` are kept by the scheduler on disk (its
private spill directory, unlinked files) while their computation lives, for nodes
that join later, and released when it closes: its memory and disk do not grow with
the files of the clients that came and went; a file over ``--max_file_size`` is
refused with a clear error."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dispynb import LocalCluster, SharedJobCluster
from dispynb.errors import DispynbError
from tests.ports import PortHolder
from tests.procmem import private_memory
from tests.sharedsched.harness import (
    WAIT,
    SchedulerProcess,
    env_for,
    finish_client,
    scheduler_cli,
    start_client,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MiB = 1 << 20
FILE = 8 * MiB
#: Clients one after the other; the first `WARM_UP` warm the scheduler up (buffers,
#: allocator arenas and its thresholds, the late node's first fetch), the memory of
#: the others is measured.
CLIENTS = 5
WARM_UP = 2

#: A client with a FILE-byte ``depends`` file: two jobs, then (once the test made the
#: ``go`` file) eight more; each job returns the file's digest and its directory.
DEPENDS_CLIENT = """
import json, os, sys, time
from dispynb import SharedJobCluster

def digest(n):
    import hashlib, os, time
    time.sleep(0.25)
    with open("big.bin", "rb") as handle:
        return [hashlib.sha256(handle.read()).hexdigest(), os.getcwd()]

address, credential, path, ran, go = sys.argv[1:6]
cluster = SharedJobCluster(
    digest, scheduler_host=address, secret_file=credential, depends=[path]
)
results = [job() for job in [cluster.submit(i) for i in range(2)]]
open(ran, "w").close()
while not os.path.exists(go):
    time.sleep(0.02)
results += [job() for job in [cluster.submit(i) for i in range(8)]]
cluster.close()
print(json.dumps({"results": results}))
"""


def spill_files(pid: int, spill: Path) -> list[int]:
    """Sizes of the files under ``spill`` the process holds open."""
    sizes = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            info = os.stat(f"/proc/{pid}/fd/{fd}")
            # (a directory held open is the scheduler's lock on its spill: 16e314e9)
            if target.startswith(str(spill)) and stat.S_ISREG(info.st_mode):
                sizes.append(info.st_size)
        except FileNotFoundError:
            continue
    return sizes


def spill_mappings(pid: int, spill: Path) -> list[str]:
    """Memory maps of files under ``spill`` the process still has (a file is sent
    from a map: a map left behind keeps the unlinked file, and its pages, alive
    with no descriptor)."""
    with open(f"/proc/{pid}/maps") as maps:
        return [line for line in maps if f" {spill}/" in line]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def first_node() -> Iterator[LocalCluster]:
    with LocalCluster(nodes=1, cpus=2) as local:
        yield local


def test_depends_kept_on_disk_for_a_late_node_and_released_at_close(
    tmp_path: Path,
    first_node: LocalCluster,
    users: dict[str, Path],
    held_port: PortHolder,
) -> None:
    credential = users["alice"]
    spill = tmp_path / "spill"
    late_port = held_port()  # the late node's, once it starts
    sched = SchedulerProcess(
        tmp_path,
        first_node.node_specs(),
        first_node.secret,
        args=("--dest_path_prefix", str(spill), "-n", f"127.0.0.1:{late_port}"),
    )
    sched.start()
    late: subprocess.Popen[bytes] | None = None
    try:
        assert sched.proc is not None
        pid = sched.proc.pid
        after: list[int] = []  # the scheduler's private memory after each client
        warm = 0  # ... once the first WARM_UP clients warmed it up
        for index in range(CLIENTS):
            data = os.urandom(FILE)
            path = tmp_path / f"c{index}" / "big.bin"
            path.parent.mkdir()
            path.write_bytes(data)
            ran, go = path.parent / "ran", path.parent / "go"
            client = start_client(
                DEPENDS_CLIENT,
                sched.address,
                str(credential),
                str(path),
                str(ran),
                str(go),
                cwd=path.parent,
                name=f"client{index}",
            )
            wait_until(ran.exists, "the client's first jobs did not run")
            # While the computation lives its file is on disk, in the spill
            # directory (unlinked: only the scheduler's descriptor reaches it).
            assert FILE in spill_files(pid, spill)
            assert all(not f.is_file() for d in spill.iterdir() for f in d.iterdir()), (
                "spill files are unlinked"
            )
            if late is None:
                # A node joins after the file was sent: it gets it from the scheduler.
                late = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "nodeserver",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(late_port),
                        "--cpus",
                        "2",
                        "--dest-path",
                        str(tmp_path / "late"),
                    ],
                    env=env_for(DISPYNB_SECRET=first_node.secret),
                    stdin=subprocess.DEVNULL,
                )
                sched.wait_for_log(f"node 127.0.0.1:{late_port} is up with")
            go.touch()
            out = finish_client(client, timeout=60)
            want = hashlib.sha256(data).hexdigest()
            assert [r[0] for r in out["results"]] == [want] * 10
            if index == 0:
                assert any(
                    r[1].startswith(str(tmp_path / "late")) for r in out["results"]
                ), out
            # Closed: the file is gone from the scheduler's disk (no descriptor,
            # no map) ...
            wait_until(
                lambda: not spill_files(pid, spill) and not spill_mappings(pid, spill),
                "the scheduler still holds a closed computation's file",
            )
            after.append(private_memory(pid))
            if index == WARM_UP - 1:
                warm = after[-1]
            elif index >= WARM_UP:
                # ... and from its memory: the clients after the warm-up leave less
                # than half a file behind in all (a file kept by any one of them
                # would be a whole one). Waited for: a buffer of the closing may
                # be freed a moment after the file's descriptor is closed.
                wait_until(
                    lambda limit=warm + FILE // 2: private_memory(pid) < limit,
                    "the scheduler's memory grew with the clients' files: "
                    + ", ".join(f"{held / MiB:.1f} MiB" for held in after),
                )
    finally:
        if late is not None:
            late.terminate()
            late.wait(WAIT)
        sched.stop()


def test_depends_over_max_file_size_is_refused(
    tmp_path: Path, first_node: LocalCluster, users: dict[str, Path]
) -> None:
    credential = users["alice"]
    with SchedulerProcess(
        tmp_path,
        first_node.node_specs(),
        first_node.secret,
        args=("--max_file_size", "1M"),
    ) as sched:
        path = tmp_path / "big.bin"
        path.write_bytes(b"x" * (2 * MiB))
        with pytest.raises(DispynbError, match="--max_file_size"):
            SharedJobCluster(
                hashlib.sha256,
                scheduler_host=sched.address,
                secret_file=str(credential),
                depends=[str(path)],
            )


@pytest.mark.timeout(60)
def test_depends_over_the_users_max_files_fail_the_setup(
    tmp_path: Path, first_node: LocalCluster, users: dict[str, Path]
) -> None:
    """A computation whose ``depends`` the scheduler does not keep (over the user's
    --max_files, or its disk would fill) fails to set up, saying why: the node
    waited for the file for ever, and the client too (a warning, then jobs that
    never ran)."""
    with SchedulerProcess(
        tmp_path,
        first_node.node_specs(),
        first_node.secret,
        args=("--max_files", "2"),
    ) as sched:
        depends = []
        for index in range(3):
            path = tmp_path / f"part{index}.bin"
            path.write_bytes(os.urandom(1000))
            depends.append(str(path))
        started = time.monotonic()
        with pytest.raises(DispynbError, match="--max_files"):
            SharedJobCluster(
                hashlib.sha256,
                scheduler_host=sched.address,
                secret_file=str(users["alice"]),
                depends=depends,
            )
        assert time.monotonic() - started < 10


def file_digest(name: str) -> str:
    """A job: the sha256 of a file in its directory."""
    import hashlib

    with open(name, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def test_revoked_users_depends_file_is_released(
    tmp_path: Path, first_node: LocalCluster, users: dict[str, Path]
) -> None:
    credential = users["bob"]
    spill = tmp_path / "spill"
    with SchedulerProcess(
        tmp_path,
        first_node.node_specs(),
        first_node.secret,
        args=("--dest_path_prefix", str(spill)),
    ) as sched:
        assert sched.proc is not None
        pid = sched.proc.pid
        data = os.urandom(MiB + 7)
        path = tmp_path / "dep.bin"
        path.write_bytes(data)
        with SharedJobCluster(
            file_digest,
            scheduler_host=sched.address,
            secret_file=str(credential),
            depends=[str(path)],
        ) as cluster:
            assert cluster.submit("dep.bin")() == hashlib.sha256(data).hexdigest()
            assert spill_files(pid, spill) == [MiB + 7]
            done = scheduler_cli(
                "user", "revoke", "bob", "--users", str(tmp_path / "users")
            )
            assert done.returncode == 0, done.stderr
            sched.wait_for_log("bob/file_digest: its user was revoked: closed")
            wait_until(
                lambda: not spill_files(pid, spill),
                "the scheduler still holds a revoked user's file",
            )


#: A client with a ``depends`` file (and a recover_file: its computation outlives
#: a lost connection) that runs a job, says so, and waits (to be stopped).
WAITING_CLIENT = """
import sys, time
from dispynb import SharedJobCluster

def size(name):
    import os
    return os.path.getsize(name)

address, credential, path, journal = sys.argv[1:5]
cluster = SharedJobCluster(
    size, scheduler_host=address, secret_file=credential, depends=[path],
    recover_file=journal,
)
job = cluster.submit("dep.bin")
result = job()
if result is None:
    print("JOB", job.status, job.exception, job.stderr, file=sys.stderr, flush=True)
print(result, flush=True)
time.sleep(300)
"""


def test_zombie_clients_depends_file_is_released(
    tmp_path: Path, first_node: LocalCluster, users: dict[str, Path]
) -> None:
    credential = users["alice"]
    spill = tmp_path / "spill"
    sched = SchedulerProcess(
        tmp_path,
        first_node.node_specs(),
        first_node.secret,
        args=("--dest_path_prefix", str(spill), "--zombie_interval", "0.1"),
    )
    sched.start()
    client: subprocess.Popen[str] | None = None
    try:
        assert sched.proc is not None
        pid = sched.proc.pid
        path = tmp_path / "dep.bin"
        path.write_bytes(os.urandom(MiB))
        client = start_client(
            WAITING_CLIENT,
            sched.address,
            str(credential),
            str(path),
            str(tmp_path / "journal"),
            cwd=tmp_path,
            name="waiting",
        )
        assert client.stdout is not None
        line = client.stdout.readline().strip()
        if line != str(MiB):  # how its job ended, and the scheduler's log
            os.killpg(client.pid, signal.SIGKILL)
            err = client.communicate(timeout=20)[1]
            client = None
            raise AssertionError(f"{line!r}: {err}\n{sched.log_text()}")
        assert spill_files(pid, spill) == [MiB]
        os.killpg(client.pid, signal.SIGSTOP)  # connected, but silent: a zombie
        sched.wait_for_log("a zombie", timeout=30)
        wait_until(
            lambda: not spill_files(pid, spill),
            "the scheduler still holds a zombie client's file",
        )
    finally:
        if client is not None:
            os.killpg(client.pid, signal.SIGKILL)
            client.communicate(timeout=20)
        sched.stop()


def test_send_file_through_the_scheduler_is_released_with_the_session(
    tmp_path: Path,
    first_node: LocalCluster,
    users: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ``send_file`` file, listed by no computation, is kept (on disk) for the
    session that sent it, and released when that client is gone."""
    credential = users["alice"]
    spill = tmp_path / "spill"
    with SchedulerProcess(
        tmp_path,
        first_node.node_specs(),
        first_node.secret,
        args=("--dest_path_prefix", str(spill)),
    ) as sched:
        assert sched.proc is not None
        pid = sched.proc.pid
        data = os.urandom(300_000)
        (tmp_path / "extra.bin").write_bytes(data)
        monkeypatch.chdir(tmp_path)  # send_file keeps the path relative to it
        with SharedJobCluster(
            file_digest, scheduler_host=sched.address, secret_file=str(credential)
        ) as cluster:
            assert cluster.send_file("extra.bin", "127.0.0.1") == 0
            assert spill_files(pid, spill) == [len(data)]
            assert cluster.submit("extra.bin")() == hashlib.sha256(data).hexdigest()
        wait_until(
            lambda: not spill_files(pid, spill),
            "the scheduler still holds a gone client's send_file file",
        )


def test_a_file_that_cannot_be_written_drops_no_other(tmp_path: Path) -> None:
    """A file the scheduler cannot write (out of descriptors, a disk error) dropped
    every file its client's session had sent (claimed by it alone: the files of
    its queued jobs, its send_file files), whose jobs then failed ('not sent')."""
    from schedserver.depfiles import ClientFiles
    from schedserver.spill import SpillStore

    class FailingStore(SpillStore):
        fail = False

        def new_file(self) -> int:
            if self.fail:
                raise OSError(24, "Too many open files")
            return super().new_file()

    store = FailingStore(str(tmp_path / "spill"), 0)
    files = ClientFiles(store, 0)
    session = object()
    kept = memoryview(b"a job's file")
    digest = hashlib.sha256(kept).hexdigest()
    try:
        assert files.put(digest, kept, session, "alice") == ""
        store.fail = True
        other = memoryview(b"another job's file")
        refused = files.put(hashlib.sha256(other).hexdigest(), other, session, "alice")
        assert "Too many open files" in refused
        assert digest in files
        assert bytes(files.get(digest) or b"") == b"a job's file"
    finally:
        files.close()
        store.close()


def test_files_count_in_their_users_max_user_kept(tmp_path: Path) -> None:
    """A user's files count in what she may hold in all (--max_user_kept), with
    her kept results: past it a file is refused, naming it; the other users'
    room is theirs; a file released gives its room back."""
    from schedserver.depfiles import ClientFiles
    from schedserver.spill import SpillStore

    store = SpillStore(str(tmp_path / "spill"), 0, user_quota=100)
    files = ClientFiles(store, 0)
    hers, his = object(), object()

    def put(text: bytes, session: object, user: str) -> str:
        data = memoryview(text)
        return files.put(hashlib.sha256(data).hexdigest(), data, session, user)

    try:
        assert put(b"a" * 60, hers, "alice") == ""
        assert store.user("alice").size == 60
        refused = put(b"b" * 50, hers, "alice")
        assert "--max_user_kept" in refused and "'alice' holds 60 bytes" in refused
        assert put(b"b" * 50, his, "bob") == ""
        files.release(hers)
        assert store.user("alice").size == 0 and store.user("bob").size == 50
        assert put(b"c" * 90, hers, "alice") == ""
    finally:
        files.close()
        store.close()
    assert store.user("alice").size == store.user("bob").size == 0


def run_tool(name: str) -> str:
    import subprocess

    return subprocess.run(
        [f"./{name}"], capture_output=True, text=True, check=True
    ).stdout


def test_an_executable_in_depends_stays_executable_through_the_scheduler(
    tmp_path: Path,
    first_node: LocalCluster,
    users: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A helper program in ``depends`` runs as ``./tool.sh`` on the scheduler's
    nodes, as on a JobCluster's (dispy keeps a sent file's mode)."""
    monkeypatch.chdir(tmp_path)
    tool = tmp_path / "tool.sh"
    tool.write_text("#!/bin/sh\necho shared tool ran\n")
    tool.chmod(0o755)
    with SchedulerProcess(
        tmp_path, first_node.node_specs(), first_node.secret
    ) as sched:
        with SharedJobCluster(
            run_tool,
            scheduler_host=sched.address,
            secret_file=str(users["alice"]),
            depends=["tool.sh"],
        ) as cluster:
            job = cluster.submit("tool.sh")
            assert job.finish.wait(WAIT), "no result"
        assert job.result == "shared tool ran\n", job.exception
