"""A large result a worker wrote to shared memory (``/dev/shm/dnr-...``) for a client
on the node's machine is gone as soon as nobody will read it, not when the client's
session ends (a notebook's kernel: hours later), whatever killed its worker.

Real local node servers; the job itself records the name its worker renamed its
result to (``os.rename`` wrapped inside the job), so that other programs' objects
in /dev/shm do not matter.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from dispynb.protocol import shm
from tests import localnodes
from tests.jobs import WAIT, wait_for_path, wait_until
from tests.nodeproc import start_node

pytestmark = pytest.mark.slow

MB = 1_000_000

local1 = localnodes.local1


def killed_after_rename(record: str, data: bytes) -> bytes:
    """Return ``data`` twice; the worker dies of SIGKILL (as the out-of-memory
    killer kills) just after it renamed the result object, before its report."""
    import os
    import signal

    rename = os.rename

    def rename_then_die(source: str, target: str) -> None:
        rename(source, target)
        with open(record, "w") as handle:
            handle.write(os.path.basename(target))
        os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename_then_die  # type: ignore[assignment]
    return data + data


def returns_when_interrupted(record: str, data: bytes) -> bytes:
    """Sleep until interrupted (its timeout), then return a large result anyway;
    the name of the result object is recorded."""
    import contextlib
    import os
    import time

    rename = os.rename

    def recording(source: str, target: str) -> None:
        rename(source, target)
        with open(record, "w") as handle:
            handle.write(os.path.basename(target))

    os.rename = recording  # type: ignore[assignment]
    with contextlib.suppress(KeyboardInterrupt):
        time.sleep(60)
    return data + data


def left(record: Path) -> bool:
    """Whether the result object whose name ``record`` holds is still there."""
    return (shm.SHM_DIR / record.read_text()).exists()


@pytest.fixture
def record(tmp_path: Path) -> Iterator[Path]:
    """Where the job writes its result object's name; the object is unlinked
    after the test whatever happened (a failing test left 4 MB in /dev/shm)."""
    path = tmp_path / "name"
    yield path
    if path.exists():
        shm.unlink(path.read_text())


def test_a_worker_killed_after_writing_its_result_leaves_no_object(local1, record):
    with JobCluster(killed_after_rename, nodes=local1) as cluster:
        job = cluster.submit(str(record), os.urandom(2 * MB))
        assert job.wait(timeout=WAIT)
        assert job.status == DispyJob.Terminated, job.exception
        assert "SIGKILL" in job.exception
        # Unlinked before the job was reported, the cluster still open.
        assert not left(record)
        # The worker is replaced: the next job runs (small: nothing to rename).
        assert cluster.submit(str(record), b"ab")() == b"abab"


def test_the_result_of_a_job_past_its_timeout_leaves_no_object(local1, record):
    """A job that catches the KeyboardInterrupt of its timeout and returns: its
    result is dropped (it ended Terminated as its timeout came), and so is its
    object, as it arrives."""
    with JobCluster(returns_when_interrupted, nodes=local1, job_timeout=1) as cluster:
        job = cluster.submit(str(record), os.urandom(2 * MB))
        assert job.wait(timeout=WAIT)
        assert job.status == DispyJob.Terminated
        wait_for_path(record)
        wait_until(lambda: not left(record))  # the cluster still open


def stuck_before_rename(marks: str, data: bytes) -> bytes:
    """Return ``data`` twice; the worker writes it to shared memory, then stops
    before the rename that makes it whole (as one still writing a large result
    does), recording the name it wrote under in ``marks`` (`recorded`)."""
    import os
    import time

    def rename_later(source: str, target: str) -> None:
        # Written whole under a name of its own first: the two workers shared
        # one, so one's rename failed (its job too), or the test read the other
        # one's still empty (and waited for /dev/shm itself to go).
        partial = os.path.join(marks, f".{os.getpid()}")
        with open(partial, "w") as handle:
            handle.write(os.path.basename(source))
        os.replace(partial, os.path.join(marks, str(os.getpid())))
        time.sleep(60)  # killed meanwhile

    os.rename = rename_later  # type: ignore[assignment]
    return data + data


def recorded(marks: Path) -> list[str]:
    """The names `stuck_before_rename`'s workers recorded whole in ``marks``."""
    return [path.read_text() for path in marks.iterdir() if path.name[0] != "."]


def test_a_killed_node_leaves_no_result_its_workers_were_writing(tmp_path):
    """The node is killed (kill -9, the out-of-memory killer) while both its
    workers write a large result: each computation process, following its node,
    kills its workers and unlinks what they were writing. Before, only the first
    worker's was unlinked: reporting it to the dead node failed, and the others
    were reaped without a look."""
    marks = tmp_path / "marks"
    marks.mkdir()
    node = start_node(tmp_path / "node", cpus=2)
    names: list[str] = []
    try:
        with JobCluster(
            stuck_before_rename, nodes=[node.spec], secret=node.secret
        ) as cluster:
            for _ in range(2):
                cluster.submit(str(marks), os.urandom(2 * MB))
            wait_until(lambda: len(recorded(marks)) == 2)
            names = recorded(marks)
            assert all((shm.SHM_DIR / name).exists() for name in names)
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(WAIT)
            wait_until(lambda: not any((shm.SHM_DIR / n).exists() for n in names))
            cluster.close(terminate=True)
    finally:
        node.stop()
        for name in names:  # (a partial name: not one `shm.unlink` takes)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(shm.SHM_DIR / name)
