"""What a job leaves in its node's directory for the node's next start.

A node reads files of its own there as it starts: the spools of results kept for
clients that may come back (``.kept*/.port``, each computation's ``meta``), its file
store's ``.boot`` and the notes of directories to remove (``.remove``). Its jobs run
as its user, so any of them can put a FIFO under those names (opening one waits for a
writer), a sparse file of terabytes, or times no clock can show. The test plants them
as such a job would (the node's user, in its directory), stops the node and starts
it again there."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nodeserver.filestore import STORED_MTIME_NS
from tests.hostile.tools import RawSession
from tests.nodeproc import NODE_WAIT, start_node

pytestmark = pytest.mark.slow

#: A spool directory, as a node names one (a digest of a recovery id).
_SPOOL = "0123456789abcdef0123456789abcdef"


def _spool(dest: Path) -> Path:
    folder = dest / ".kept" / _SPOOL
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _meta(dest: Path, text: str) -> None:
    (_spool(dest) / "meta").write_text(text)


def _sparse_meta(dest: Path) -> None:
    with open(_spool(dest) / "meta", "wb") as handle:
        handle.truncate(1 << 40)  # 1 TiB of nothing: no disk taken


def _fifo(*parts: str) -> Callable[[Path], None]:
    def plant(dest: Path) -> None:
        path = dest.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        os.mkfifo(path)

    return plant


def _fifo_meta(dest: Path) -> None:
    os.mkfifo(_spool(dest) / "meta")


def _fifo_boot(dest: Path) -> None:
    """A FIFO as ``.boot``, read at start when the store holds files: one is put
    there, as stored (its fixed modification time)."""
    stored = dest / ".store" / ("ab" * 32)
    stored.write_bytes(b"data")
    os.utime(stored, ns=(STORED_MTIME_NS, STORED_MTIME_NS))
    _fifo(".store", ".boot")(dest)


#: What a job plants, by name.
PLANTS: dict[str, Callable[[Path], None]] = {
    "FIFO as a spool's meta": _fifo_meta,
    "FIFO as the spool's .port": _fifo(".kept", ".port"),
    "FIFO as the store's .boot": _fifo_boot,
    "FIFO as a removal note": _fifo(".remove", "0123456789abcdef"),
    "1 TiB sparse meta": _sparse_meta,
    "NaN times in meta": lambda dest: _meta(
        dest, '{"name": "x", "keep": NaN, "expires": NaN}'
    ),
    "year 10^292 in meta": lambda dest: _meta(
        dest, '{"name": "x", "keep": 60, "expires": 1e300}'
    ),
    "forged log line as a name": lambda dest: _meta(
        dest,
        json.dumps({"name": "x\nFORGED ERROR line", "keep": 60, "expires": 1e10}),
    ),
}


def _restart(tmp_path: Path, plant: Callable[[Path], None]) -> str:
    """Plant in a node's directory, start the node again there: what came of it."""
    node = start_node(tmp_path / "node")
    assert node.stop() == 0
    plant(tmp_path / "node" / "dest")
    (tmp_path / "node" / "port").unlink()
    started = time.monotonic()
    try:
        node = start_node(tmp_path / "node", secret=node.secret)
    except AssertionError as exc:  # it hung, or exited
        return str(exc).splitlines()[0][:60]
    try:
        session = RawSession.open(node.port, node.secret)
        session.close()
        took = time.monotonic() - started
        log = node.log_text()
        if "FORGED ERROR" in log.replace("\\nFORGED", ""):
            return f"served in {took:.1f} s, a forged log line"
        return f"served in {took:.1f} s"
    finally:
        node.stop(signal.SIGKILL)


@pytest.mark.attack(
    id="dest-path-plants",
    title="A job puts in its node's directory, for the node's next start: FIFOs as "
    "the files the node reads there (a spool's meta and .port, the store's .boot, a "
    "removal note), a 1 TiB sparse meta, NaN and 1e300 times, a name forging a log "
    "line",
    goal="the node starts and serves each time, within its start time; no forged "
    "line in its log (was: it hung on each FIFO, exited at start on the sparse "
    "file and the odd times, and logged the forged line)",
)
@pytest.mark.timeout(len(PLANTS) * (3 * NODE_WAIT + 10))
def test_the_node_starts_whatever_its_jobs_left_in_its_directory(
    tmp_path: Path, measure
) -> None:
    outcomes = {}
    for index, (name, plant) in enumerate(PLANTS.items()):
        outcomes[name] = _restart(tmp_path / str(index), plant)
    measure("; ".join(f"{name}: {what}" for name, what in outcomes.items()))
    assert all(
        what.startswith("served") and "forged" not in what for what in outcomes.values()
    ), outcomes
