"""The node's file store: files nobody holds are a cache bounded in bytes, with the
node's own processes (a real `dispynb-node`, real clusters) and on its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dispynb import JobCluster
from dispynb.errors import ProtocolError
from dispynb.protocol.files import digest_of
from nodeserver.filestore import BOOT_MARK, STORED_MTIME_NS, FileStore
from tests.jobs import wait_until
from tests.nodeproc import running_node

KiB = 1 << 10


def put(store: FileStore, data: bytes) -> str:
    digest = digest_of(memoryview(data))
    store.put(digest, data)
    return digest


def stored(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.name != BOOT_MARK}


def test_files_nobody_holds_are_kept_up_to_the_cache_size_idle_longest_first(
    tmp_path: Path,
):
    root = tmp_path / "store"
    store = FileStore(str(root), cache_size=25 * KiB)
    a, b, c = (put(store, bytes([i]) * (10 * KiB)) for i in range(3))
    for digest in (a, b, c):
        store.hold(digest)
    store.release(b)
    store.release(a)
    assert stored(root) == {a, b, c} and store.cached_bytes == 20 * KiB
    store.release(c)  # 30 KiB idle: b, idle longest, goes
    assert stored(root) == {a, c} and store.cached_bytes == 20 * KiB
    store.hold(a)  # in use again: out of the cache, never removed while held
    assert store.cached_bytes == 10 * KiB
    d = put(store, bytes([3]) * (20 * KiB))
    store.hold(d)
    store.release(d)  # 30 KiB idle: c, idle longer than d, goes; a is held
    assert stored(root) == {a, d} and store.cached_bytes == 20 * KiB


def test_a_full_disk_takes_room_from_idle_files_only_idle_longest_first(
    tmp_path: Path,
):
    root = tmp_path / "store"
    store = FileStore(str(root))
    a, b, c, held = (put(store, bytes([i]) * (10 * KiB)) for i in range(4))
    for digest in (a, b, c, held):
        store.hold(digest)
    for digest in (b, a, c):
        store.release(digest)
    assert store.make_room(15 * KiB)  # b then a, idle longest; c stays
    assert stored(root) == {c, held} and store.cached_bytes == 10 * KiB
    assert store.make_room(100 * KiB)  # all that is idle, never a held file
    assert stored(root) == {held} and store.cached_bytes == 0
    assert not store.make_room(KiB)  # nothing left to free


def test_a_store_without_cache_removes_what_nobody_holds(tmp_path: Path):
    root = tmp_path / "store"
    store = FileStore(str(root), cache_size=0)
    a = put(store, b"a" * KiB)
    store.hold(a)
    store.hold(a)
    store.release(a)
    assert stored(root) == {a}  # one holder left
    store.release(a)
    assert stored(root) == set()


def test_files_left_by_an_earlier_run_count_in_the_cache(tmp_path: Path):
    root = tmp_path / "store"
    first = FileStore(str(root))
    old = put(first, b"o" * (10 * KiB))
    new = put(first, b"n" * (10 * KiB))
    os.utime(root / old, ns=(1, STORED_MTIME_NS))  # used longer ago
    (root / f"{new}.123.456.part").write_bytes(b"half a file")

    second = FileStore(str(root), cache_size=15 * KiB)

    assert stored(root) == {new}
    assert second.cached_bytes == 10 * KiB


def test_a_stored_file_a_job_wrote_to_is_never_given_again(tmp_path: Path):
    """A computation's file is a link to the stored one: once a job wrote to it, the
    store takes it for missing (sent again), refuses to place it, and drops it from
    its cache, now and in a next run; the job's own link keeps what it wrote."""
    root, job_dir = tmp_path / "store", tmp_path / "job"
    job_dir.mkdir()
    store = FileStore(str(root))
    digest = put(store, b"as sent\n")
    store.hold(digest)
    placed = Path(store.place(digest, str(job_dir), "data.txt"))
    with open(placed, "a") as handle:  # what a job may do with a file it was given
        handle.write("changed\n")

    assert not store.has(digest)
    with pytest.raises(ProtocolError, match=r"'again\.txt' was changed on this node"):
        store.place(digest, str(job_dir), "again.txt")
    store.put(digest, b"as sent\n")  # the client sends it again
    assert store.has(digest)
    assert Path(store.place(digest, str(job_dir), "again.txt")).read_bytes() == (
        b"as sent\n"
    )
    assert placed.read_bytes() == b"as sent\nchanged\n"  # the job's own copy

    (job_dir / "again.txt").write_bytes(b"overwritten")  # changed again, then idle
    store.release(digest)
    assert stored(root) == set() and store.cached_bytes == 0

    other = put(store, b"other")
    os.truncate(root / other, 1)  # by a job of an earlier run of the node
    assert stored(root) == {other}
    FileStore(str(root))
    assert stored(root) == set()


def size_of(name: str) -> int:
    import os

    return os.path.getsize(name)


@pytest.mark.slow
def test_a_node_keeps_at_most_its_file_cache_and_never_a_file_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Clusters come and go on a node started with --file-cache-size: its store
    keeps the files of closed clusters up to that size, a cluster set up again
    with an evicted file gets it sent again, and an open cluster's files stay."""
    monkeypatch.chdir(tmp_path)
    names = [f"data{i}.bin" for i in range(3)]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(bytes([i]) * (60 * KiB))
    digests = [digest_of(memoryview((tmp_path / n).read_bytes())) for n in names]
    with running_node(tmp_path / "node", "--file-cache-size", "100k") as node:
        store = tmp_path / "node" / "dest" / ".store"

        def run(name: str) -> int:
            with JobCluster(
                size_of, nodes=[node.spec], secret=node.secret, depends=[name]
            ) as cluster:
                return cluster.submit(name)()

        def holds(*indexes: int) -> None:
            """The store comes to hold these files (the node lets a closed
            cluster's files go after its client has gone)."""
            wanted = {digests[i] for i in indexes}
            wait_until(lambda: stored(store) == wanted)

        assert run(names[0]) == 60 * KiB
        holds(0)  # cached: 60 KiB of 100
        assert run(names[1]) == 60 * KiB
        holds(1)  # 120 KiB: data0, idle longest, went
        assert run(names[0]) == 60 * KiB  # sent again
        holds(0)
        with JobCluster(
            size_of, nodes=[node.spec], secret=node.secret, depends=[names[2]]
        ) as open_cluster:
            assert run(names[1]) == 60 * KiB  # 120 KiB idle: only data1 is kept
            holds(1, 2)
            assert open_cluster.submit(names[2])() == 60 * KiB


def whole_file(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def run_on_node(tmp_path: Path, data: Path) -> str:
    """What a job of a node in ``tmp_path/node`` reads of ``data``, sent to it."""
    with (
        running_node(tmp_path / "node") as node,
        JobCluster(
            whole_file, nodes=[node.spec], secret=node.secret,
            depends=[str(data)], recover_file=False,
        ) as cluster,
    ):  # fmt: skip
        return cluster.submit(data.name)()


def power_loss(tmp_path: Path, data: Path, length: int) -> Path:
    """Leave ``data``'s stored copy as a power loss may: named, dated, its data
    cut to ``length`` bytes; the node may start again (its port file gone)."""
    store = tmp_path / "node" / "dest" / ".store"
    (kept,) = (p for p in store.iterdir() if p.name == digest_of(data.read_bytes()))
    os.truncate(kept, length)
    os.utime(kept, ns=(STORED_MTIME_NS, STORED_MTIME_NS))
    (tmp_path / "node" / "port").unlink()
    return store


@pytest.mark.slow
def test_a_stored_file_a_power_loss_emptied_is_sent_again(tmp_path: Path):
    """A stored file is renamed into place before the disk has its data (not
    synced): a power loss leaves it empty, with its name and stored time. The node
    started again took it for intact, so its client did not send it again and the
    job read an empty file."""
    data = tmp_path / "data.txt"
    data.write_text("as sent\n")
    assert run_on_node(tmp_path, data) == "as sent\n"
    power_loss(tmp_path, data, 0)
    assert run_on_node(tmp_path, data) == "as sent\n"


@pytest.mark.slow
def test_a_stored_file_a_power_loss_cut_short_is_sent_again(tmp_path: Path):
    """A power loss during the kernel's writeback of a stored file leaves it cut
    short, not empty, with its name and stored time. The node started after the
    machine's reboot took it for intact and its job read a part of the file; now it
    checks the digests of the files an earlier boot left unsynced, and the client
    sends it again."""
    data = tmp_path / "data.txt"
    data.write_text("as sent\n" * 1000)
    assert run_on_node(tmp_path, data) == data.read_text()
    store = power_loss(tmp_path, data, 4096)
    # The node ran in a boot of the machine that ended before it could stop.
    (store / BOOT_MARK).write_text("an-earlier-boot running\n")
    assert run_on_node(tmp_path, data) == data.read_text()


def test_files_are_checked_only_if_the_machine_stopped_before_they_were_synced(
    tmp_path: Path,
):
    """A node that died alone left its files whole (the page cache has them), and
    one that stopped put them on the disk: no start reads them all again."""
    root = str(tmp_path / "store")
    store = FileStore(root)
    digest = digest_of(b"whole file")
    store.put(digest, b"whole file")
    os.truncate(store.path(digest), 4)  # a check would remove it
    os.utime(store.path(digest), ns=(STORED_MTIME_NS, STORED_MTIME_NS))
    assert FileStore(root).has(digest)  # the same boot: not checked
    store.close()
    with open(os.path.join(root, BOOT_MARK)) as handle:
        _boot, state = handle.read().split()
    assert state == "synced"
    with open(os.path.join(root, BOOT_MARK), "w") as handle:
        handle.write(f"an-earlier-boot {state}\n")
    assert FileStore(root).has(digest)  # synced before the machine stopped
    with open(os.path.join(root, BOOT_MARK), "w") as handle:
        handle.write("an-earlier-boot running\n")
    assert not FileStore(root).has(digest)  # not synced, another boot: checked
