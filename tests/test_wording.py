"""`dispynb.wording`: counts said in the right number, where admins read them."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dispynb.deploy.adaptive import Adaptive
from dispynb.protocol.files import digest_of
from dispynb.wording import counted
from nodeserver.filestore import BOOT_MARK, STORED_MTIME_NS, FileStore
from nodeserver.outbox import ResultOutbox
from nodeserver.spool import ResultSpool, SpoolDir
from schedserver.clients import _Clients
from schedserver.computation import SharedComputation


def test_one_is_singular_and_the_others_plural() -> None:
    assert [counted(n, "CPU") for n in (0, 1, 2)] == ["0 CPUs", "1 CPU", "2 CPUs"]
    assert counted(2, "process", "processes") == "2 processes"


def test_a_scheduler_quota_of_one_session_says_one_session() -> None:
    """``--max_sessions 1`` refused a second cluster saying 'has 1 sessions open'."""
    server = SimpleNamespace(
        config=SimpleNamespace(max_sessions=1),
        sessions=[SimpleNamespace(user="al", ending=False)],  # (a live one)
    )
    said = _Clients._over_sessions(server, "al")  # type: ignore[arg-type]
    assert said.startswith("refused: user 'al' has 1 session open at the scheduler")


# -- log lines of one thing (each called as the daemon calls it, with a count of 1) --


def _said(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


def test_a_node_spooling_one_result_says_one_result(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """'1 results of computation ... could not be spooled', 'its 1 kept results are
    offered' (a torn meta file beside one result)."""
    caplog.set_level(logging.INFO)
    spools = ResultSpool(str(tmp_path / "kept"), 1 << 20)
    spool = spools.create("recovery-id", "comp")
    ResultSpool.report_failures(
        SpoolDir(spool.path, "comp", failed=1, failure="disk full"), "now written"
    )
    Path(spool.path, f"r{0:020d}-{1:08d}.{'0' * 32}").write_bytes(b"x")
    Path(spool.path, "meta").write_bytes(b'{"name": "comp", "ke')
    assert len(spools.load()) == 1
    said = _said(caplog)
    assert "1 result of computation comp could not be spooled" in said, said
    assert "offering its 1 kept result for " in said, said


def test_a_node_store_of_one_file_says_one_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """'checked 1 (1 bytes) ...; 1 lost data and were removed', 'removed 1 cached
    files nobody uses (1 bytes) to store one of 1 bytes'."""
    caplog.set_level(logging.INFO)
    root = tmp_path / "store"
    store = FileStore(str(root))
    digest = digest_of(memoryview(b"x"))
    store.put(digest, b"x")
    store.close()
    (root / digest).write_bytes(b"y")  # garbled by a power loss, say
    os.utime(root / digest, ns=(time.time_ns(), STORED_MTIME_NS))  # as stored
    (root / BOOT_MARK).unlink()  # the machine stopped before the node did
    store = FileStore(str(root))
    kept = digest_of(memoryview(b"z"))
    store.put(kept, b"z")
    store.hold(kept)
    store.release(kept)
    assert store.make_room(1)
    said = _said(caplog)
    assert "checked 1 file (1 byte) in " in said, said
    assert "removed 1 file that lost data (sent again)" in said, said
    full = (
        "disk full: removed 1 cached file nobody uses (1 byte) to store one of 1 byte"
    )
    assert full in said, said


def test_a_session_that_lost_one_more_message_says_one_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    outbox = SimpleNamespace(lost=2, conn=SimpleNamespace(peer="127.0.0.1:5"))
    ResultOutbox.report_lost(outbox)  # type: ignore[arg-type]
    assert "1 more message to 127.0.0.1:5 not sent" in _said(caplog)


def test_adapting_up_to_one_node_says_one_node(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    adapter = SimpleNamespace(
        _only_drain=False,
        options=SimpleNamespace(minimum=0, maximum=1, idle_timeout=60.0),
        _thread=threading.Thread(target=lambda: None),
    )
    Adaptive.start(adapter)  # type: ignore[arg-type]
    adapter._thread.join(5)
    assert "adapt: 0 to 1 node, idle timeout 60 s" in _said(caplog)


class _OneKept(list[object]):
    size = on_disk = 1 << 20


def test_a_scheduler_keeping_one_message_for_a_client_says_one_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """'...; 1 messages (...) wait for its client'."""
    caplog.set_level(logging.INFO)
    computation = SimpleNamespace(name="comp", queue=[], kept=_OneKept([object()]))
    SharedComputation._say_what_waits(computation)  # type: ignore[arg-type]
    assert _said(caplog) == (
        "comp: no job of it runs, 0 waiting; 1 message (1.0 MiB, 1.0 MiB of it on "
        "disk) kept for its client"
    )
