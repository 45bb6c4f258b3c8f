"""A node server killed (kill -9, the OOM killer) takes its computations with it,
whatever signal handlers their setup or jobs installed.

A computation process follows its node through a pidfd (`containment.NodeWatch`),
not through a parent-death signal: ``nohup``-style code that ignores SIGHUP used
to keep a computation, its workers and what its setup started running for nobody.
Real ``python -m nodeserver`` processes, killed with SIGKILL.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import psutil
import pytest

from dispynb import JobCluster
from tests.jobs import (
    WAIT,
    computation_processes,
    mark_and_sleep,
    square,
    wait_for_path,
    wait_until,
)
from tests.nodeproc import start_node

pytestmark = pytest.mark.slow

#: What a setup started, kept in the computation's globals (as a pool would be).
_kept: list[subprocess.Popen[bytes]] = []


def _ignore_sighup_and_hold(record: str, release: str) -> int:
    """A setup that ignores SIGHUP, starts a child, writes both pids to ``record``
    and waits (60 s at most) for ``release``."""
    import pathlib
    import signal
    import subprocess
    import time

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "120"])
    # Renamed into place: the test reads it as soon as it exists.
    pathlib.Path(f"{record}.tmp").write_text(f"{os.getpid()} {child.pid}")
    os.replace(f"{record}.tmp", record)
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return 0


def _ignore_sighup_and_start_a_child(record: str) -> int:
    """A setup that ignores SIGHUP and leaves a child running for the jobs."""
    import pathlib
    import signal
    import subprocess

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "120"])
    _kept.append(child)
    pathlib.Path(record).write_text(f"{os.getpid()} {child.pid}")
    return 0


def _ignore_sighup_and_sleep(directory: str) -> None:
    """A job that ignores SIGHUP, starts a child and writes both pids."""
    import pathlib
    import signal
    import subprocess
    import time

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "120"])
    marker = pathlib.Path(directory, str(os.getpid()))
    marker.with_suffix(".tmp").write_text(f"{os.getpid()} {child.pid}")
    marker.with_suffix(".tmp").replace(marker)
    time.sleep(60)


def _pids(path: Path) -> list[psutil.Process]:
    return [psutil.Process(int(pid)) for pid in path.read_text().split()]


def _left(processes: list[psutil.Process]) -> list[str]:
    """Those of ``processes`` still running after `WAIT` seconds (not zombies)."""
    _gone, alive = psutil.wait_procs(processes, timeout=WAIT)
    left = []
    for process in alive:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid} {process.cmdline()}")
        except psutil.NoSuchProcess:
            pass
    return left


def test_a_setup_ignoring_sighup_ends_with_a_killed_node(tmp_path: Path) -> None:
    """kill -9 of the node while a setup that ignores SIGHUP runs: the computation
    process and the child its setup started end (they ran on until the setup's
    end, here 60 s, and the child for ever)."""
    record, release = tmp_path / "record", tmp_path / "release"
    node = start_node(tmp_path / "node")
    failed: list[BaseException] = []

    def set_up() -> None:
        setup = functools.partial(_ignore_sighup_and_hold, str(record), str(release))
        try:
            JobCluster(square, nodes=[node.spec], secret=node.secret, setup=setup)
        except Exception as exc:  # the node is gone: how is not this test's point
            failed.append(exc)

    setting_up = threading.Thread(target=set_up, daemon=True)
    setting_up.start()
    try:
        wait_until(record.exists)
        processes = _pids(record)
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(WAIT)
        assert _left(processes) == []
    finally:
        release.touch()
        node.stop()
        setting_up.join(WAIT)
    assert failed, "the cluster was made on a killed node"


def test_jobs_of_a_setup_ignoring_sighup_end_with_a_killed_node(
    tmp_path: Path,
) -> None:
    """kill -9 of the node while jobs run, their setup and the jobs ignoring SIGHUP
    and each having started a child: no process of the computation remains."""
    record, jobs = tmp_path / "record", tmp_path / "jobs"
    jobs.mkdir()
    node = start_node(tmp_path / "node", cpus=2)
    setup = functools.partial(_ignore_sighup_and_start_a_child, str(record))
    cluster = JobCluster(
        _ignore_sighup_and_sleep, nodes=[node.spec], secret=node.secret, setup=setup
    )
    try:
        for _ in range(2):
            cluster.submit(str(jobs))
        wait_until(lambda: len([p for p in jobs.iterdir() if p.suffix == ""]) == 2)
        processes = _pids(record)
        for marker in jobs.iterdir():
            if marker.suffix == "":
                processes += _pids(marker)
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(WAIT)
        assert _left(processes) == []
    finally:
        cluster.close(terminate=True)
        node.stop()


def test_a_node_stopped_during_a_setup_says_so_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    """SIGTERM (systemctl stop) to a node while a setup that started a child runs:
    the client is told that the node shut down (it read 'the computation's process
    on the node exited during setup'), and the setup's child does not outlive the
    node (the computation process, killed as it could not stop in its setup, left
    it to the node)."""
    record, release = tmp_path / "record", tmp_path / "release"
    node = start_node(tmp_path / "node")
    failed: list[BaseException] = []

    def set_up() -> None:
        setup = functools.partial(_ignore_sighup_and_hold, str(record), str(release))
        try:
            JobCluster(square, nodes=[node.spec], secret=node.secret, setup=setup)
        except Exception as exc:
            failed.append(exc)

    setting_up = threading.Thread(target=set_up, daemon=True)
    setting_up.start()
    try:
        wait_until(record.exists)
        processes = _pids(record)
        assert node.stop() == 0
        assert _left(processes) == []
        setting_up.join(WAIT)
    finally:
        release.touch()
        node.stop()
    assert [str(exc) for exc in failed] == [
        f"{node.spec}: the node shut down during the setup (it was stopped: SIGTERM, "
        "a service manager, or a shutdown request)"
    ]


@pytest.mark.parametrize(
    ("level", "zygote"), [("info", "1"), ("warning", "1"), ("info", "0")]
)
def test_a_computation_process_logs_as_its_node_does(
    tmp_path: Path, level: str, zygote: str
) -> None:
    """A computation process left by a killed node logs its end as the node logs:
    in the node's format, at info but not under ``--loglevel warning``; forked by
    the zygote or (``DISPYNB_ZYGOTE=0``) started as a new interpreter. Before, the
    zygote's processes had no logging configured: the line came bare, whatever
    the level."""
    node = start_node(
        tmp_path / "node",
        "--loglevel",
        level,
        launcher=["env", f"DISPYNB_ZYGOTE={zygote}"],
    )
    marker = tmp_path / "job"
    cluster = JobCluster(mark_and_sleep, nodes=[node.spec], secret=node.secret)
    try:
        cluster.submit(str(marker), 600)
        wait_for_path(marker)
        computations = computation_processes(psutil.Process(node.proc.pid))
        names = [p.name() for p in computations]  # workers: their process's name
        assert ("dispynb-compute" in names) == (zygote == "1"), names
        node.stop(signal.SIGKILL)
        assert psutil.wait_procs(computations, timeout=WAIT)[1] == []
    finally:
        cluster.close(terminate=True, timeout=5)
        node.stop()
    log = node.log_text()
    lines = [line for line in log.splitlines() if "node server gone" in line]
    if level == "warning":
        assert lines == [], log
    else:
        assert len(lines) == 1, log
        assert re.fullmatch(
            r"\S+ \S+ nodeserver\.compute INFO computation process: node server "
            r"gone; stopping",
            lines[0],
        ), log
