"""Results a node keeps for crashed clients survive what its disk is left with after
a crash: a ``meta`` file torn by a power loss, a node killed mid-write.

Real ``dispynb-node`` processes, real clients, SIGKILL."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from nodeserver import spool as spool_module
from nodeserver.spool import ResultSpool
from tests.api.test_recovery import (
    assert_every_job_recovered,
    kill_client_mid_run,
    recover_in_new_process,
)
from tests.nodeproc import start_node
from tests.test_durable_files import synced

pytestmark = pytest.mark.slow


def recover_after_damage(
    tmp_path: Path, damage: Callable[[Path], None]
) -> tuple[subprocess.CompletedProcess[str], str]:
    """A client killed mid-run, its node stopped once the results are kept (it
    drains), ``damage(spool root)`` done to the files as a crash leaves them, the
    node started again on the directory: recover_jobs's run and the node's log."""
    node = start_node(tmp_path / "node", cpus=20)
    try:
        journal = kill_client_mid_run(tmp_path, node, started=20)
        assert node.stop() == 0  # drains: the running jobs end, their results kept
        damage(tmp_path / "node" / "dest" / ".kept")
        (tmp_path / "node" / "port").unlink()
        node = start_node(
            tmp_path / "node", "--port", str(node.port), cpus=20, secret=node.secret
        )
        done = recover_in_new_process(tmp_path, journal, node.secret)
    finally:
        node.stop(signal.SIGKILL)
    return done, node.log_text()


@pytest.mark.parametrize("torn", [b"", b'{"name": "compute", "ke'])
def test_a_torn_meta_file_costs_no_kept_result(tmp_path: Path, torn: bytes) -> None:
    """The node stops once its client's results are kept; its spool's
    ``meta`` is left as a torn write leaves it (empty, or cut short): a node started
    again on the directory offers the results all the same, and says why."""

    def tear(root: Path) -> None:
        metas = list(root.glob("*/meta"))
        assert len(metas) == 1, metas
        metas[0].write_bytes(torn)

    done, log = recover_after_damage(tmp_path, tear)
    assert_every_job_recovered(done)
    assert "meta file is damaged" in log


def spy_flushes(monkeypatch: pytest.MonkeyPatch, flushed: list[str]) -> asyncio.Event:
    """Record the spool's flushes (each in a thread, never the loop's) in
    ``flushed``; the event is set at the first."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def spy(path: str) -> None:
        assert threading.current_thread() is not threading.main_thread()
        flushed.append(path)
        loop.call_soon_threadsafe(done.set)

    monkeypatch.setattr(spool_module, "syncfs", spy)
    return done


def test_how_long_results_are_kept_is_flushed_off_the_loop_with_the_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spool's ``meta`` (what says its results are kept, and how long) is not
    synced on the node's loop: on a slow disk each flush stalled the loop, its
    pulses and every client's jobs (tests/hostile/test_slow_disk.py). It is
    flushed in a thread within `SYNC_DELAY`, as results are, and before them: a
    flush that has a result on the disk has its ``meta`` too. A ``meta`` a power
    loss tore costs no result (above)."""
    flushed: list[str] = []
    calls = synced(monkeypatch)

    async def main() -> None:
        done = spy_flushes(monkeypatch, flushed)
        spool = ResultSpool(str(tmp_path / ".kept"), 1 << 20)
        kept = spool.create("a-recovery-id", "compute")
        kept.expires = 1.0
        assert spool.write_meta(kept)
        assert calls == [] and flushed == []  # nothing on the loop
        await asyncio.wait_for(done.wait(), 30)

    asyncio.run(main())
    assert flushed == [str(tmp_path / ".kept")]


def test_spooled_results_are_flushed_together_soon_after_they_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of results spooled by a running node: one flush of the file system
    for all of them, in a thread, within `SYNC_DELAY` (a flush of each costs ~50
    times its write: 2.4 ms against 0.05 ms for a small result here)."""
    flushed: list[str] = []

    async def main() -> None:
        done = spy_flushes(monkeypatch, flushed)
        spool = ResultSpool(str(tmp_path / ".kept"), 1 << 20)
        kept = spool.create("a-recovery-id", "compute")
        for key in range(50):
            entry = [key, 1, "finished", 0.0, 1.0, "", "", None, 1]
            assert spool.write(kept, entry, [memoryview(b"x")])
        assert flushed == []  # not one by one
        await asyncio.wait_for(done.wait(), 30)

    asyncio.run(main())
    assert flushed == [str(tmp_path / ".kept")]


def test_a_kept_result_a_crash_tore_is_reported_as_run_and_lost(tmp_path: Path) -> None:
    """A result file left empty (as a power loss leaves one written just before):
    recover_jobs said its job "never reached the node: it did not run", though it
    ran (a job that must not run twice would be run again). It says the node ran
    the job and lost its result; the others come back."""

    def empty_one(root: Path) -> None:
        files = sorted(root.glob("*/r*"))
        assert files
        files[0].write_bytes(b"")

    done, _log = recover_after_damage(tmp_path, empty_one)
    assert done.returncode == 0, done.stderr
    jobs = json.loads(done.stdout)
    lost = [job for job in jobs if job[2] != 11]
    assert len(lost) == 1, jobs
    assert lost[0][2] == 10, lost  # Abandoned
    assert "the node ran the job" in lost[0][4] and "did not run" not in lost[0][4]
    assert [job[3] for job in jobs if job[2] == 11] == [
        n * n for n in range(20) if f"job-{n}" != lost[0][0]
    ]
