"""Kept results on disk: `ResultSpool` files, and `ResultKeeper` on top of it."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import stat
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import msgpack
import pytest

from dispynb.protocol.messages import ABANDONED
from dispynb.protocol.records import Utf8Text
from nodeserver import keptresults, spoolcheck
from nodeserver.keeper import ResultKeeper
from nodeserver.spool import KeptUnavailable, ResultSpool
from nodeserver.spoolclaim import SpoolClaim, claim_spool
from nodeserver.spoolfile import MAGIC
from tests.nodeserver.test_spool_race import keep_a_computation

RID = "5f3c0a9e1b2d4c6e8f00112233445566"


def entry(key: int) -> list[object]:
    return [key, 1, "finished", 0.5, 1.5, "out", "", None, 1]


def result(key: int, size: int = 10) -> tuple[list[object], list[memoryview]]:
    return entry(key), [memoryview(bytes([key % 256]) * size)]


def held(key: int) -> int:
    """Bytes a node counts for holding ``result(key)`` in memory."""
    return keptresults._held_size(*result(key))


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_results_round_trip_in_private_files_without_the_recovery_id(tmp_path: Path):
    spool = ResultSpool(str(tmp_path / ".kept"), 1 << 20)
    directory = spool.create(RID, "comp")
    for key in range(3):
        assert spool.write(directory, *result(key))
    assert mode(tmp_path / ".kept") == mode(directory.path) == 0o700
    files = sorted(Path(directory.path).iterdir())
    assert files[0].name == "meta" and len(files) == 4
    assert all(mode(p) == 0o600 for p in files)
    assert all(RID.encode() not in p.read_bytes() for p in files)
    assert RID not in directory.path
    read = [spool.read(directory, path) for path, _ in directory.files]
    assert [(e, [bytes(b) for b in bufs]) for e, bufs in read] == [  # type: ignore[misc]
        (entry(k), [bytes([k]) * 10]) for k in range(3)
    ]
    assert spool.used == directory.size > 30
    spool.remove(directory)
    assert spool.used == 0 and not os.path.exists(directory.path)


def test_a_result_is_read_back_mapped_with_its_buffer_kinds(tmp_path: Path):
    """A spooled result's buffers are views of a copy only the node reaches (in
    memory, or over 1 MiB a map of a file with no name) and keep their kinds (a
    bytes buffer streams as one); a file of an older node (format 1: no check) is
    not offered."""
    spool = ResultSpool(str(tmp_path), 8 << 20)
    directory = spool.create(RID, "comp")
    two = [*entry(1)[:8], 2]  # its result in two buffers
    assert spool.write(directory, two, [memoryview(b"p"), memoryview(b"bb")], "b")
    ((path, _size),) = directory.files
    opened = spool.open(directory, path)
    assert opened is not None
    got_entry, buffers, kinds = opened
    assert got_entry == two and kinds == "b"
    assert [bytes(b) for b in buffers] == [b"p", b"bb"]
    # Read into memory (small): the file may change as it is sent.
    assert all(type(b.obj) is bytearray for b in buffers)
    large = [memoryview(b"L" * (2 << 20))]
    assert spool.write(directory, [*entry(3)[:8], 1], large)
    opened = spool.open(directory, directory.files[-1][0])
    assert opened is not None
    (copy,) = opened[1]
    assert copy == large[0] and copy.readonly and type(copy.obj).__name__ == "mmap"
    # A map of a copy of its own: what the file holds now is not what is sent.
    with open(directory.files[-1][0], "r+b") as handle:
        handle.seek(1000)
        handle.write(b"changed")
    assert copy == large[0]
    del opened, copy
    header = msgpack.packb({"entry": entry(2), "sizes": [1]}, use_bin_type=True)
    older = Path(directory.path) / "r-older"
    older.write_bytes(b"DNBK0001" + struct.pack("<Q", len(header)) + header + b"x")
    assert spool.open(directory, str(older)) is None


@pytest.mark.parametrize("held", [bytes, memoryview])
def test_output_kept_as_utf8_is_spooled_and_read_back_so(tmp_path: Path, held):
    """A result whose output the node keeps as UTF-8 (`Utf8Text`: bytes, or a view
    of the worker's message it came in) is spooled as those bytes and read back
    so: not decoded, nor taken for a program's bytes."""
    spool = ResultSpool(str(tmp_path), 1 << 20)
    directory = spool.create(RID, "comp")
    text = Utf8Text(held("\U0001f600\n".encode() * 1000))
    kept = [1, 1, "finished", 0.5, 1.5, text, b"program", None, 0]
    assert spool.write(directory, kept, [])
    ((path, _size),) = directory.files
    assert spool.open(directory, path) == (kept, [], "")


def test_total_size_is_bounded_with_one_clear_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    spool = ResultSpool(str(tmp_path), 12288)
    directory = spool.create(RID, "comp")
    with caplog.at_level(logging.WARNING, "nodeserver.spool"):
        assert spool.write(directory, *result(1, 7000))
        assert not spool.write(directory, *result(2, 7000))
        assert not spool.write(directory, *result(3, 7000))
    warnings = [r.message for r in caplog.records]
    assert len(warnings) == 1 and "raise --kept-results-size" in warnings[0]
    assert directory.dropped == 2 and len(directory.files) == 1


def test_the_bound_counts_the_disk_space_of_many_small_results(tmp_path: Path):
    """--kept-results-size is disk space: each result file takes whole blocks, so a
    million tiny results (about 150 bytes each, a 4 KiB block each on disk) must not
    be counted as 150 MB while they fill 4 GB of disk and a million inodes."""
    bound = 64 * 4096
    spool = ResultSpool(str(tmp_path), bound)
    directory = spool.create(RID, "comp")
    written = 0
    while written < 10_000 and spool.write(directory, *result(written)):
        written += 1
    assert written > 0 and directory.dropped == 1
    on_disk = sum(
        os.stat(path).st_blocks * 512 for path in Path(directory.path).glob("r*")
    )
    assert on_disk <= bound, f"{written} results take {on_disk} bytes of disk"
    assert spool.used >= on_disk
    again = ResultSpool(str(tmp_path), bound)  # a restarted node counts the same
    again.load()
    assert again.used == spool.used


def test_load_keeps_live_spools_and_deletes_expired_and_broken_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    first = ResultSpool(str(tmp_path), 1 << 20)
    live = first.create(RID, "live")
    first.write(live, *result(1))
    expired = first.create("another-id", "old")
    first.write(expired, *result(2))
    expired.expires = time.time() - 1
    first.write_meta(expired)
    (tmp_path / "junk").mkdir()  # no meta
    with caplog.at_level(logging.WARNING, "nodeserver.spool"):
        again = ResultSpool(str(tmp_path), 1 << 20)
        found = again.load()
    assert list(found) == [ResultSpool.key(RID)]
    assert found[ResultSpool.key(RID)].name == "live"
    assert again.used == found[ResultSpool.key(RID)].size
    assert not os.path.exists(expired.path) and not (tmp_path / "junk").exists()
    # A damaged result file is reported, not trusted.
    spool = found[ResultSpool.key(RID)]
    again.check_names(spool, RID)
    path = spool.files[0][0]
    Path(path).write_bytes(MAGIC + b"\xff" * 64)
    assert again.read(spool, path) is None
    assert any("failed the node's check" in r.message for r in caplog.records)


class FakeComputation:
    name = "comp"

    def __init__(self) -> None:
        self.closed: list[bool] = []

    async def close(self, terminate: bool) -> None:
        self.closed.append(terminate)


def test_restarted_node_logs_how_many_kept_results_it_offers_and_until_when(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """It logged "kept results of computation comp (2) offered until they expire":
    an unexplained count, and no expiry time."""

    async def main() -> None:
        keeper = ResultKeeper(ResultSpool(str(tmp_path), 1 << 20))
        kept = keeper.register(RID, FakeComputation())  # type: ignore[arg-type]
        for key in range(2):
            kept.record(*result(key))
        keeper.adopt(RID, 600)
        await asyncio.wait_for(kept.finished.wait(), 5)
        await keeper.close()
        restarted = ResultKeeper(ResultSpool(str(tmp_path), 1 << 20))
        with caplog.at_level(logging.INFO, logger="nodeserver.keeper"):
            assert restarted.load() == 1
        await restarted.close()

    asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "kept result" in r.message]
    until = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert len(lines) == 1
    match = re.fullmatch(
        rf"computation comp: 2 kept results offered to its client until {until} "
        r"\((\d+) s from now\), then removed",
        lines[0],
    )
    assert match and 500 < int(match[1]) <= 600, lines


def test_keeper_spools_delivers_and_survives_a_restart(tmp_path: Path):
    async def main() -> None:
        keeper = ResultKeeper(ResultSpool(str(tmp_path), 1 << 20))
        kept = keeper.register(RID, FakeComputation())  # type: ignore[arg-type]
        for key in range(3):
            kept.record(*result(key))
        assert kept.results == []  # on disk, not in memory
        keeper.adopt(RID, 60)
        await asyncio.wait_for(kept.finished.wait(), 5)
        await keeper.close()  # the node stops; the results stay on disk

        restarted = ResultKeeper(ResultSpool(str(tmp_path), 1 << 20))
        assert restarted.load() == 1
        claimed = restarted.claim(RID, lambda result: None)
        assert claimed is not None and claimed[0].finished.is_set()
        kept, recorded = claimed
        assert all(r.path is not None and not r.buffers for r in recorded)  # on disk
        got = [kept.open(r) for r in recorded]
        assert [(e[0], [bytes(b) for b in bufs]) for e, bufs, _kinds in got] == [
            (k, [bytes([k]) * 10]) for k in range(3)
        ]
        assert restarted.claim("wrong-id", lambda result: None) is None
        restarted.release(RID)  # collected: the files go
        assert os.listdir(tmp_path) == []
        await restarted.close()

    asyncio.run(main())


def test_keeper_keeps_what_an_acknowledging_client_has_not_journaled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """With acknowledgements: results wait in memory, journaled ones are dropped
    (also one written to disk for want of room), the rest go to disk when the
    client is lost, in their order."""
    monkeypatch.setattr(keptresults, "PENDING_BYTES", 3 * held(0))

    async def main() -> None:
        keeper = ResultKeeper(ResultSpool(str(tmp_path), 1 << 20))
        kept = keeper.register(RID, FakeComputation())  # type: ignore[arg-type]
        kept.acked = True
        for key in range(4):  # the fourth has no room in memory
            kept.record(*result(key))
        assert sorted(kept.pending) == [(0, 1), (1, 1), (2, 1)]
        assert len(kept.spool.files) == 1  # type: ignore[union-attr]
        keeper.journaled(RID, [(1, 1), (3, 1), (9, 9)])  # 9: unknown, ignored
        assert sorted(kept.pending) == [(0, 1), (2, 1)]
        assert kept.spool.files == []  # type: ignore[union-attr]
        assert keeper._spool.used == 0  # type: ignore[union-attr]
        keeper.adopt(RID, 60)  # its client is gone: the rest go to disk
        assert kept.pending == {}
        await asyncio.wait_for(kept.finished.wait(), 5)
        claimed = keeper.claim(RID, lambda result: None)
        assert claimed is not None
        got = [claimed[0].open(r) for r in claimed[1]]
        assert [(e[0], [bytes(b) for b in bufs]) for e, bufs, _kinds in got] == [
            (0, [bytes([0]) * 10]),
            (2, [bytes([2]) * 10]),
        ]
        await keeper.close()

    asyncio.run(main())


def test_what_clients_have_not_acknowledged_is_bounded_on_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """The node holds 16 MiB per computation and 64 MiB in all (here three
    results and five); a result's output counts; what one computation held is
    given back as it is acknowledged, written to disk or released."""
    monkeypatch.setattr(keptresults, "PENDING_BYTES", 3 * held(0))
    monkeypatch.setattr(keptresults, "PENDING_NODE_BYTES", 5 * held(0))

    async def main() -> None:
        keeper = ResultKeeper(ResultSpool(str(tmp_path), 1 << 20))
        first = keeper.register(RID, FakeComputation())  # type: ignore[arg-type]
        second = keeper.register("s" * 32, FakeComputation())  # type: ignore[arg-type]
        first.acked = second.acked = True
        entry, buffers = result(0)
        entry[5] = "x" * 3 * held(0)  # its output counts
        first.record(entry, buffers)
        assert first.pending == {} and len(first.spool.files) == 1  # type: ignore[union-attr]
        for key in range(1, 4):
            first.record(*result(key))
            second.record(*result(key))
        # Three in the first, two in the second: the node's five; one on disk.
        assert len(first.pending) == 3 and len(second.pending) == 2
        assert len(second.spool.files) == 1  # type: ignore[union-attr]
        keeper.journaled(RID, [(1, 1)])
        second.record(*result(4))
        assert len(second.pending) == 3
        keeper.release("s" * 32)  # closed by its client: nothing of it is kept
        second.record(*result(5))
        assert second.pending == {} and not os.path.exists(second.spool.path)  # type: ignore[union-attr]
        assert not [r for r in caplog.records if "cannot spool" in r.message]
        keeper.adopt(RID, 60)
        assert first.budget.used == 0
        await keeper.close()

    asyncio.run(main())


def test_provisional_results_kept_are_bounded_on_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The latest provisional result of each running job is held in memory, as
    unacknowledged results are: within `PENDING_BYTES` per computation and
    `PENDING_NODE_BYTES` for all of them (every journaled cluster keeps them, and
    a client may set up many); given back as a job ends or its computation goes.
    Each computation held its own 16 MiB, however many there were."""
    monkeypatch.setattr(keptresults, "PENDING_BYTES", 300)
    monkeypatch.setattr(keptresults, "PENDING_NODE_BYTES", 500)

    async def main() -> None:
        keeper = ResultKeeper(ResultSpool(str(tmp_path), 1 << 20))
        kept = [
            keeper.register(f"{n}" * 32, FakeComputation())  # type: ignore[arg-type]
            for n in range(3)
        ]
        for each in kept:
            for key in range(2):
                each.keep_provisional(key, 1, [memoryview(b"p" * 100)])
        # 200 bytes each would be 600: the third computation holds only 100.
        assert [len(each.provisional) for each in kept] == [2, 2, 1]
        assert kept[0].budget.used == 500
        kept[0].record(*result(0))  # job 0 ended: its goes
        assert kept[0].budget.used == 400
        kept[2].keep_provisional(1, 1, [memoryview(b"p" * 100)])
        assert len(kept[2].provisional) == 2
        keeper.release("1" * 32)  # closed by its client
        assert kept[0].budget.used == 300
        await keeper.close()

    asyncio.run(main())


def test_keeper_drops_results_when_they_expire(tmp_path: Path):
    async def main() -> None:
        keeper = ResultKeeper(ResultSpool(str(tmp_path), 1 << 20))
        kept = keeper.register(RID, FakeComputation())  # type: ignore[arg-type]
        kept.record(*result(1))
        keeper.adopt(RID, 0.05)
        await asyncio.wait_for(kept.finished.wait(), 5)
        for _ in range(500):
            if not os.listdir(tmp_path):
                break
            await asyncio.sleep(0.01)
        assert os.listdir(tmp_path) == []
        assert keeper.claim(RID, lambda result: None) is None
        await keeper.close()

    asyncio.run(main())


def test_results_not_kept_cost_the_node_a_few_bytes_each_and_still_say_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """With the spool full, a computation that runs on (a long recover_file run)
    records each job's end without its result: that record must stay small, else
    the node's memory grows with every job for as long as the computation lives
    (~380 bytes a job before). Recovery still gets each job's end and the reason."""
    keeper = ResultKeeper(ResultSpool(str(tmp_path), 0))  # nothing fits on disk
    kept = keeper.register(RID, FakeComputation())  # type: ignore[arg-type]
    per_round = 2000
    grown = []
    with caplog.at_level(logging.ERROR, "nodeserver.spool"):
        tracemalloc.start()
        try:
            for round_ in range(3):
                before = tracemalloc.get_traced_memory()[0]
                for key in range(round_ * per_round, (round_ + 1) * per_round):
                    entry, buffers = result(key)
                    entry[3:5] = [1000.0 + key, 2000.0 + key]
                    kept.record(entry, buffers)
                grown.append(tracemalloc.get_traced_memory()[0] - before)
        finally:
            tracemalloc.stop()
    assert all(size < 64 * per_round for size in grown), grown
    claimed = keeper.claim(RID, lambda result: None)
    assert claimed is not None
    _kept, recorded = claimed
    entries = [r.entry for r in recorded]
    assert [e[:5] for e in entries] == [
        [key, 1, ABANDONED, 1000.0 + key, 2000.0 + key] for key in range(3 * per_round)
    ]
    assert all("--kept-results-size" in e[7] for e in entries)


def test_a_result_not_kept_of_a_key_over_64_bits_is_still_recorded(tmp_path: Path):
    """Job keys and attempts are the client's numbers (any msgpack integer)."""
    keeper = ResultKeeper(ResultSpool(str(tmp_path), 0))
    kept = keeper.register(RID, FakeComputation())  # type: ignore[arg-type]
    for key in (1, 1 << 63, 2):
        kept.record(*result(key))
    claimed = keeper.claim(RID, lambda result: None)
    assert claimed is not None
    assert sorted(r.entry[0] for r in claimed[1]) == [1, 2, 1 << 63]


def test_a_node_of_a_fixed_port_takes_the_kept_results_spool_it_used_last(
    tmp_path: Path,
):
    """Nodes sharing a dest_path each hold a spool of their own; started again (in
    any order), a node with a fixed port gets its own back, and one without a port
    takes a spool no fixed port claims (each keeping results: one holding none is
    removed as its node stops)."""
    claims: list[SpoolClaim] = []

    def claim(port: int) -> SpoolClaim:
        claims.append(claim_spool(str(tmp_path), port))
        keep_a_computation(str(claims[-1].root))
        return claims[-1]

    try:
        first, second = claim(9711), claim(9712)
        assert first.root == str(tmp_path / ".kept")
        assert os.path.dirname(second.root) == str(tmp_path) != second.root
        first.release()
        second.release()
        again = claim(9712)  # first: .kept is free, but not its own
        assert again.root == second.root
        portless = claim(0)  # not the one 9711 used
        assert portless.root not in (first.root, second.root)
        assert claim(9711).root == first.root
        portless.release()
        assert claim(0).root == portless.root
    finally:
        for each in claims:
            each.release()


def test_a_result_held_in_memory_does_not_keep_its_workers_message(tmp_path: Path):
    """Output the node holds as a view of its worker's message (`Utf8Text` over
    a memoryview) is copied, as the result's buffers are, when the result waits
    in memory for its client's acknowledgement: the message is not kept alive."""

    async def main() -> None:
        keeper = ResultKeeper(ResultSpool(str(tmp_path), 1 << 20))
        kept = keeper.register(RID, FakeComputation())  # type: ignore[arg-type]
        kept.acked = True
        message = bytearray(b"out" * 100 + b"result")
        view = memoryview(message)
        text = Utf8Text(view[:300])
        entry = [0, 1, "finished", 0.5, 1.5, text, "", None, 1]
        kept.record(entry, [view[300:]])
        del text, entry
        view.release()
        message.extend(b"!")  # raises BufferError while a view of it is alive
        held = kept.pending[(0, 1)]
        assert type(held.entry[5].data) is bytes and held.entry[5].decode() == (
            "out" * 100
        )
        await keeper.close()

    asyncio.run(main())


def test_results_the_disk_refused_are_said_held_in_memory_not_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A computation whose results the disk refused (held in memory since) is
    removed: the line said "its results are gone", as if they had been lost."""
    caplog.set_level(logging.INFO, logger="nodeserver.spool")
    spools = ResultSpool(str(tmp_path / "kept"), 1 << 20)
    spool = spools.create(RID, "comp")
    spool.failed, spool.failure = 2, "[Errno 28] No space left on device"
    spools.remove(spool)
    (said,) = [r.getMessage() for r in caplog.records if "spooled" in r.message]
    assert "2 results of computation comp could not be spooled" in said, said
    assert "held in memory instead" in said and "gone" not in said, said
    assert not os.path.exists(spool.path)


def test_results_held_in_memory_are_said_lost_when_the_node_stops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Results the disk refused are held in memory for the client's recovery; the
    node's stop loses them: its line only counted them as not spooled."""
    caplog.set_level(logging.INFO, logger="nodeserver")

    async def main() -> None:
        keeper = ResultKeeper(ResultSpool(str(tmp_path / "kept"), 1 << 20))
        kept = keeper.register(RID, FakeComputation())  # type: ignore[arg-type]
        assert kept.spool is not None
        os.rename(kept.spool.path, tmp_path / "gone")  # its disk fails each write
        for key in range(3):
            kept.record(*result(key))
        assert len(kept.results) == 3  # held in memory
        await keeper.close()

    asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if "lost" in r.message]
    assert len(said) == 1, said
    assert said[0].startswith(
        "computation comp: 3 results held in memory for its client's recover_jobs "
        "are lost as the node stops (its disk refused them: [Errno 2] No such file "
        "or directory"
    ), said
    assert said[0].endswith(
        "free space in the node's --dest-path, or let the node write there)"
    ), said


def test_results_held_without_a_spool_are_said_lost_by_name_and_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A node with no spool (none it could claim in its --dest-path) holds the
    results of a computation whose client went away in memory; its stop loses them.
    Its jobs over, the line called it "computation ?", and advised freeing disk
    space or raising --kept-results-size, which neither gives it a spool."""
    caplog.set_level(logging.INFO, logger="nodeserver")

    async def main() -> None:
        keeper = ResultKeeper(None)
        kept = keeper.register(RID, FakeComputation())  # type: ignore[arg-type]
        for key in range(2):
            kept.record(*result(key))
        assert len(kept.results) == 2  # held in memory
        kept.computation = None  # its jobs ended (`ResultKeeper._finish`)
        await keeper.close()

    asyncio.run(main())
    (said,) = [r.getMessage() for r in caplog.records if "lost" in r.message]
    assert said.startswith(
        "computation comp: 2 results held in memory for its client's recover_jobs "
        "are lost as the node stops (the node has no spool for them: it found none "
        "it could claim in its --dest-path"
    ), said
    assert "--dest-path of its own" in said and "kept-results-size" not in said, said


def test_a_large_result_without_room_for_its_copy_is_kept_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result over 1 MiB is sent from a copy in a file with no name; with no room
    on the disk for it, a copy in memory (within `spoolcheck.MEMORY_COPY`), else
    `KeptUnavailable`: not lost (a result the node could not read was reported
    lost, then deleted)."""
    spool = ResultSpool(str(tmp_path), 8 << 20)
    directory = spool.create(RID, "comp")
    large = [memoryview(b"L" * (2 << 20))]
    assert spool.write(directory, [*entry(1)[:8], 1], large)
    path = directory.files[-1][0]
    real_open = os.open

    def disk_full(name: str, flags: int, *args: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", disk_full)
    opened = spool.open(directory, path)  # in memory: 2 MiB is not much
    assert opened is not None and opened[1][0] == large[0]
    del opened
    monkeypatch.setattr(spoolcheck, "MEMORY_COPY", 1 << 20)
    with pytest.raises(KeptUnavailable, match="disk space"):
        spool.open(directory, path)
    monkeypatch.undo()
    assert spool.open(directory, path) is not None  # still there, whole


def test_a_large_result_on_a_file_system_without_unnamed_files_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where no file system makes a file without a name (NFS), a result is sent
    from a copy in memory, never from a map of its own file
    (`test_a_job_cutting_a_large_kept_file_short_never_kills_the_node`); within
    `spoolcheck.MEMORY_COPY` only, as where the disk is full: a larger one stays
    kept, the client told what the node's operator is to do, said once in the
    node's log. Was: copied to memory whatever its size, as many times as clients
    recovered it at once."""
    spool = ResultSpool(str(tmp_path), 8 << 20)
    directory = spool.create(RID, "comp")
    large = [memoryview(b"L" * (2 << 20))]
    assert spool.write(directory, [*entry(1)[:8], 1], large)
    real_open = os.open

    def no_unnamed(name: str, flags: int, *args: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", no_unnamed)
    monkeypatch.setattr(spoolcheck, "MEMORY_COPY", 1 << 20)
    monkeypatch.setattr(spoolcheck, "_UNNAMED_WARNED", False)
    for _ in range(2):
        with pytest.raises(KeptUnavailable) as refused:
            spool.open(directory, directory.files[-1][0])
    said = [r.message for r in caplog.records if "files without a name" in r.message]
    assert len(said) == 1, said
    assert "stay kept until the node is restarted with TMPDIR" in said[0], said
    assert "copies 1 MiB at most" in str(refused.value), refused.value
    assert "restart the node with TMPDIR on a local file system" in str(refused.value)
    monkeypatch.setattr(spoolcheck, "MEMORY_COPY", 4 << 20)
    for _ in range(2):
        opened = spool.open(directory, directory.files[-1][0])
        assert opened is not None and opened[1][0] == large[0]
        with open(directory.files[-1][0], "r+b") as handle:
            handle.seek(1000)
            handle.write(b"changed")  # not what is sent: a copy
        assert opened[1][0] == large[0]
        with open(directory.files[-1][0], "r+b") as handle:
            handle.seek(1000)
            handle.write(b"L" * 7)
        del opened


#: A node's spool read where no file system makes files without a name (O_TMPFILE
#: refused as NFS refuses it: an `os.open` that says so, as no such file system
#: can be mounted here), a job cutting a large kept file short as the node checks
#: it, and another cutting one short before it is read. Prints what each read gave.
CUT_SHORT = """
import errno, os, sys
from nodeserver import spool as spool_module, spoolcheck
from nodeserver.spool import ResultSpool

real_open = os.open
def no_unnamed(name, flags, *args):
    if flags & os.O_TMPFILE == os.O_TMPFILE:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
    return real_open(name, flags, *args)
os.open = no_unnamed
spoolcheck.MEMORY_COPY = 16 << 20
real_copy = spool_module.private_copy
def cut(after):
    def copy(fd, size, directory):
        if not after:
            os.truncate(f"/proc/self/fd/{fd}", 4096)
        made = real_copy(fd, size, directory)
        if after:
            # the job's, as the node checks the result:
            os.truncate(f"/proc/self/fd/{fd}", 4096)
        return made
    return copy
spool = ResultSpool(sys.argv[1], 64 << 20)
directory = spool.create("5f3c0a9e1b2d4c6e8f00112233445566", "comp")
entry = [1, 1, "finished", 0.5, 1.5, "out", "", None, 1]
for after in (True, False):
    assert spool.write(directory, entry, [memoryview(b"L" * (8 << 20))])
    spool_module.private_copy = cut(after)
    opened = spool.open(directory, directory.files[-1][0])
    print(None if opened is None else bytes(opened[1][0]) == b"L" * (8 << 20),
          flush=True)
"""


@pytest.mark.timeout(60)
def test_a_job_cutting_a_large_kept_file_short_never_kills_the_node(
    tmp_path: Path,
) -> None:
    """Where no file system makes files without a name (NFS), a kept result over
    `spoolcheck.MEMORY_COPY` was checked and sent from a map of its own file: a job
    (the node's user) that cut the file short as the node read the map killed the
    node (SIGBUS). Now the node reads a copy of its own: one cut short after the
    copy is sent whole, one cut short before is lost, saying why, and the node
    lives on."""
    done = subprocess.run(
        [sys.executable, "-c", CUT_SHORT, str(tmp_path / ".kept")],
        capture_output=True,
        text=True,
        timeout=50,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["True", "None"], done.stdout
    assert "cut short" in done.stderr, done.stderr[-2000:]
