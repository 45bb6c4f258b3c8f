"""The client's segment pool (dispynb.protocol.shmpool) and the sweep of dead
clients' objects (dispynb.protocol.shm.sweep)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb.protocol import serialize, shm
from dispynb.protocol.shmpool import GRANULE, SegmentPool
from tests.shmtools import OpenWatch, live_inodes

MB = 1_000_000


@pytest.fixture
def pool() -> Iterator[SegmentPool]:
    made = SegmentPool(max_idle=2, max_idle_bytes=8 * GRANULE)
    yield made
    made.close()


def inode(name: str) -> int:
    return (shm.SHM_DIR / name).stat().st_ino


def test_a_finished_jobs_segment_is_reused_under_a_new_name(
    pool: SegmentPool,
) -> None:
    first, _ = pool.write([os.urandom(2 * MB)])
    number = inode(first)
    pool.release(first)
    assert not (shm.SHM_DIR / first).exists()  # renamed: the old name opens nothing
    data = os.urandom(2 * MB - 100)
    second, reference = pool.write(serialize.dumps(data))
    assert second != first and inode(second) == number
    assert (pool.created, pool.reused) == (1, 1)
    assert shm.load_reference(reference, serialize.loads) == data
    # Too small for a larger payload: a new object, the old one stays idle.
    pool.release(second)
    third, _ = pool.write([b"y" * (3 * MB)])
    assert inode(third) != number and pool.created == 2


def test_segments_not_reused_or_over_the_bounds_are_unlinked(
    pool: SegmentPool,
) -> None:
    names = [pool.write([b"z" * MB])[0] for _ in range(4)]
    numbers = {inode(n) for n in names}
    pool.release(names[0], reuse=False)  # cancelled job: its worker may still read
    for name in names[1:]:
        pool.release(name)
    assert len(numbers & live_inodes()) == 2  # max_idle
    pool.close()
    assert not numbers & live_inodes()


def test_close_unlinks_segments_still_in_use(pool: SegmentPool) -> None:
    name, _ = pool.write([b"q" * MB])
    number = inode(name)
    pool.close()
    assert number not in live_inodes()


def test_sweep_leaves_a_live_clients_segments(pool: SegmentPool) -> None:
    busy, _ = pool.write([b"a" * MB])
    idle, _ = pool.write([b"b" * MB])
    pool.release(idle)
    numbers = {inode(busy), *(inode(n) for n in pool.names())}
    shm.sweep()
    assert numbers <= live_inodes()


def test_sweep_does_not_even_open_a_live_clients_segment(pool: SegmentPool) -> None:
    name, _ = pool.write([b"c" * MB])
    info = (shm.SHM_DIR / name).stat()
    # The pool's flock is listed in /proc/locks, which the sweep reads first.
    assert (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino) in (
        shm._flocked_files()
    )
    with OpenWatch(shm.SHM_DIR / name) as watch:
        shm.sweep()  # in this process (others' sweeps beside may open it: not ours)
        assert os.getpid() not in watch.openers()
        # The check can fail: an open is seen.
        os.close(os.open(shm.SHM_DIR / name, os.O_RDONLY))
        assert os.getpid() in watch.openers()


KILLED = textwrap.dedent(
    """
    import sys, time
    from dispynb.protocol.shmpool import SegmentPool

    pool = SegmentPool()
    busy, _ = pool.write([b"x" * 2_000_000])
    idle, _ = pool.write([b"y" * 2_000_000])
    pool.release(idle)
    print(busy, *pool.names(), flush=True)
    time.sleep(60)
    """
)


def test_sweep_removes_the_segments_of_a_client_killed_with_sigkill(
    tmp_path: Path,
) -> None:
    script = tmp_path / "client.py"
    script.write_text(KILLED)
    client = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )
    names: list[str] = []
    try:
        assert client.stdout is not None
        names = client.stdout.readline().split()
        assert len(set(names)) == 2  # one in use, one idle
        numbers = {inode(n) for n in set(names)}
        assert numbers <= live_inodes()
        shm.sweep()
        assert numbers <= live_inodes()  # alive: locked
        client.send_signal(signal.SIGKILL)
        client.wait(30)
        assert shm.sweep() >= 2
        assert not numbers & live_inodes()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        if client.stdout is not None:
            client.stdout.close()
        for name in names:
            shm.unlink(name)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_an_unlocked_object_of_another_user_is_left_alone() -> None:
    name = "dnb-" + os.urandom(16).hex()
    path = shm.SHM_DIR / name
    path.write_bytes(b"theirs")
    try:
        os.chown(path, 65534, 65534)
        shm.sweep()
        assert path.exists()
    finally:
        shm.unlink(name)
