"""Exclusive clusters through a real dispynb-scheduler, and who may run them.

One user's ``SharedJobCluster(exclusive=True)`` stops every other user's jobs until
it closes (dispy's meaning), so the administrator names who may
(``--exclusive_users``). By default nobody: another user's exclusive cluster still
runs, shared, and its client is warned with what to ask the administrator.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest

from dispynb import LocalCluster, SharedJobCluster
from dispynb.errors import ConfigurationError
from dispynb.job import JobStatus
from schedserver.cli import config_from_args, parse_args
from tests.jobs import wait_until
from tests.sharedsched.harness import SchedulerProcess, scheduler_cli, start_client
from tests.sharedsched.nodeuse import held

pytestmark = pytest.mark.timeout(120)

WAIT = 20.0


def nap(n: int, seconds: float) -> int:
    import time

    time.sleep(seconds)
    return n


@pytest.mark.slow
def test_exclusive_is_declined_by_default_and_the_cluster_runs_shared(
    scheduler: SchedulerProcess,
    nodes: LocalCluster,
    users: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A scheduler started without --exclusive_users: alice's exclusive=True
    cluster runs, but bob's jobs run beside hers (before, they waited until she
    closed); her client logs a warning naming the option to ask for."""
    started = tmp_path / "started"
    started.mkdir()
    release = tmp_path / "release"
    with (
        caplog.at_level(logging.WARNING, logger="dispynb"),
        SharedJobCluster(
            held,
            scheduler_host=scheduler.address,
            secret_file=str(users["alice"]),
            exclusive=True,
        ) as alice,
    ):
        hers = alice.submit(0, str(started), str(release))
        wait_until((started / "0").exists)
        with SharedJobCluster(
            nap, scheduler_host=scheduler.address, secret_file=str(users["bob"])
        ) as bob:
            his = [bob.submit(i, 0.01) for i in range(6)]
            assert bob.wait(timeout=WAIT), [job.status for job in his]
            assert [job.result for job in his] == list(range(6))
        assert hers.status == JobStatus.Running
        release.touch()
        assert hers() in nodes.names  # the node that ran it
    said = [r.getMessage() for r in caplog.records if "declined" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"scheduler {scheduler.address} reports: "), said
    assert "user 'alice'" in said[0] and "--exclusive_users" in said[0]
    assert "administrator" in said[0] and "runs shared" in said[0]
    assert said[0].count("bob") == 0  # nothing of other users
    scheduler.wait_for_log("exclusive=True declined (user 'alice'")


@pytest.mark.slow
def test_an_exclusive_cluster_of_a_user_named_runs_alone(
    tmp_path: Path,
    nodes: LocalCluster,
    users: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``--exclusive_users alice,carol``: as dispy's, her exclusive cluster waits
    for the running jobs of others, then runs alone; others' jobs wait until it
    closes, and their client is told why, once, without alice's name (before, bob's
    jobs waited with no word, for as long as her cluster stayed open). The
    scheduler's log says who may at start, warning of carol, who is no user (a typo
    would go unseen: that user's exclusive clusters run shared), and that alice's
    runs exclusive."""
    scheduler = SchedulerProcess(
        tmp_path,
        nodes.node_specs(),
        nodes.secret,
        ("--exclusive_users", "alice,carol"),
    ).start()
    try:
        log = scheduler.log_text()
        assert "exclusive clusters: for alice, carol only (--exclusive_users)" in log
        assert "WARNING --exclusive_users names 'carol', not in the users file" in log
        with (
            caplog.at_level(logging.WARNING, logger="dispynb"),
            SharedJobCluster(
                nap, scheduler_host=scheduler.address, secret_file=str(users["bob"])
            ) as bob,
        ):
            first = [bob.submit(i, 1.0) for i in range(4)]
            # all four in flight (as dispy's, an exclusive cluster waits for running
            # jobs only: queued ones of others wait for it)
            deadline = time.monotonic() + WAIT
            while not all(
                job.status in (JobStatus.Running, JobStatus.Finished) for job in first
            ):
                assert time.monotonic() < deadline, [job.status for job in first]
                time.sleep(0.02)
            with SharedJobCluster(
                nap,
                scheduler_host=scheduler.address,
                secret_file=str(users["alice"]),
                exclusive=True,
            ) as alice:
                later = [bob.submit(i, 0.1) for i in range(4, 8)]
                mine = [alice.submit(i, 0.3) for i in range(4)]
                assert [job() for job in mine] == list(range(4))
                assert [job() for job in first] == list(range(4))
                alice_start = min(job.start_time for job in mine)
                alice_end = max(job.end_time for job in mine)
                # alice started once bob's running jobs had ended ...
                assert alice_start >= max(job.end_time for job in first) - 0.05
            # ... and bob's later jobs waited until alice had closed
            assert [job() for job in later] == list(range(4, 8))
            assert min(job.start_time for job in later) >= alice_end - 0.05
        told = [r.getMessage() for r in caplog.records if " wait: " in r.getMessage()]
        assert told == [
            f"scheduler {scheduler.address} reports: the jobs of 'nap' wait: another "
            "user's exclusive cluster (exclusive=True) runs alone on this "
            "scheduler's nodes, and they start once it closes"
        ]
        log = scheduler.log_text()
        assert "alice/nap runs exclusive: no other user's job starts" in log
        assert "alice/nap closed: other users' jobs run again" in log
    finally:
        scheduler.stop()


#: A client (``ADDRESS CREDENTIAL JOURNAL``) with an exclusive cluster and a
#: recover_file: one job, then it says so and waits to be killed.
EXCLUSIVE_CLIENT = """
import sys, time
from dispynb import SharedJobCluster

def one(n):
    return n

address, credential, journal = sys.argv[1], sys.argv[2], sys.argv[3]
cluster = SharedJobCluster(
    one, scheduler_host=address, secret_file=credential, recover_file=journal,
    exclusive=True,
)
assert cluster.submit(7)() == 7
print("done", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_an_exclusive_cluster_whose_client_died_stops_nobody(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """Alice's exclusive cluster, its client killed (its results kept for her
    recover_jobs, up to --keep_results: an hour): Bob's jobs run at once. Before,
    they waited for that hour, the whole lab stopped by a notebook that died."""
    scheduler = SchedulerProcess(
        tmp_path, nodes.node_specs(), nodes.secret, ("--exclusive_users", "alice")
    ).start()
    try:
        proc = start_client(
            EXCLUSIVE_CLIENT, scheduler.address, str(users["alice"]),
            str(tmp_path / "alice.journal"), cwd=tmp_path, name="alice",
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "done"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        scheduler.wait_for_log("client gone")
        with SharedJobCluster(
            nap, scheduler_host=scheduler.address, secret_file=str(users["bob"])
        ) as bob:
            his = [bob.submit(i, 0.01) for i in range(4)]
            assert bob.wait(timeout=WAIT), [job.status for job in his]
            assert [job.result for job in his] == list(range(4))
        assert "alice/one: its client is gone: no longer exclusive" in (
            scheduler.log_text()
        )
    finally:
        scheduler.stop()


#: A client (``ADDRESS CREDENTIAL MARKS RELEASE``) with an exclusive cluster: one
#: job that runs until ``RELEASE`` exists; says "running", then (once continued)
#: how it ended, and prints the warnings its cluster logged.
STOPPED_EXCLUSIVE_CLIENT = """
import logging, sys
from dispynb import SharedJobCluster
from tests.sharedsched.nodeuse import held

logging.basicConfig(level=logging.WARNING, format="said: %(message)s")
address, credential, marks, release = sys.argv[1:5]
with SharedJobCluster(
    held, scheduler_host=address, secret_file=credential, exclusive=True
) as cluster:
    job = cluster.submit(0, marks, release)
    import os, time
    while not os.path.exists(os.path.join(marks, "0")):
        time.sleep(0.01)
    print("running", flush=True)
    job()
    print("ended", int(job.status), flush=True)
"""


@pytest.mark.slow
def test_a_stopped_exclusive_client_stops_nobody_and_holds_again_once_back(
    tmp_path: Path, nodes: LocalCluster, users: dict[str, Path]
) -> None:
    """Alice's exclusive cluster runs a job; her client is stopped (SIGSTOP: Ctrl-Z,
    a paused VM). Before, Bob's jobs waited until --zombie_interval (an hour) took
    her for gone. Now they run once she has been silent 10 s; her job goes
    on, and her client, continued, is told, and holds the nodes alone again."""
    scheduler = SchedulerProcess(
        tmp_path, nodes.node_specs(), nodes.secret, ("--exclusive_users", "alice")
    ).start()
    marks, release = tmp_path / "marks", tmp_path / "release"
    marks.mkdir()
    proc = start_client(
        STOPPED_EXCLUSIVE_CLIENT, scheduler.address, str(users["alice"]),
        str(marks), str(release), cwd=tmp_path, name="alice",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "running"
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            with SharedJobCluster(
                nap, scheduler_host=scheduler.address, secret_file=str(users["bob"])
            ) as bob:
                his = [bob.submit(i, 0.01) for i in range(4)]
                # Silent 10 s (a live client's program may hold its I/O thread
                # that long), then they run.
                assert bob.wait(timeout=30), [job.status for job in his]
                assert [job.result for job in his] == list(range(4))
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        scheduler.wait_for_log("heard from again after")
        release.touch()
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        scheduler.stop()
    assert proc.returncode == 0, out + err
    assert f"ended {int(JobStatus.Finished)}" in out  # her job went on
    log = scheduler.log_text()
    assert "user 'alice' (" in log and "alice/held no longer stops other users'" in log
    assert "alice/held exclusive again once other users' running jobs end" in log
    assert "a zombie" not in log
    said = [line for line in err.splitlines() if "let other users' jobs run" in line]
    assert len(said) == 1, err
    assert said[0].startswith(f"said: scheduler {scheduler.address} reports: "), said
    assert "exclusive computation alice/held" in said[0]
    silent = said[0].partition("heard nothing from this client for about ")[2]
    assert int(silent.split(" ")[0]) >= 10, said  # the time it was stopped


@pytest.mark.parametrize(
    ("given", "allowed"),
    [
        ([], frozenset()),  # the default: none
        (["--exclusive_users", "none"], frozenset()),
        (["--exclusive_users", "all"], None),  # dispyscheduler's rule
        (["--exclusive-users", "alice, bob"], frozenset({"alice", "bob"})),
        (["--exclusive_users", "alice", "--exclusive_users", "carol"], {"carol"}),
    ],
)
def test_exclusive_users_are_taken_from_the_command_line(
    given: list[str], allowed: frozenset[str] | None
) -> None:
    config = config_from_args(parse_args(["--users", "u", *given]))
    assert config.exclusive_users == allowed


def test_exclusive_users_are_taken_from_a_config_file(tmp_path: Path) -> None:
    """As every option: from ``--config`` (and written by ``--save_config``)."""
    saved = scheduler_cli(
        "--users", "u", "--exclusive_users", "alice,bob", "--save_config", "-"
    )
    assert saved.returncode == 0, saved.stderr
    assert "exclusive_users = alice,bob" in saved.stdout
    path = tmp_path / "sched.ini"
    path.write_text(saved.stdout)
    path.chmod(0o600)
    config = config_from_args(parse_args(["--config", str(path)]))
    assert config.exclusive_users == {"alice", "bob"}


@pytest.mark.parametrize("value", ["al!ce", "alice,all", "none,bob", ""])
def test_bad_exclusive_users_are_refused_in_one_line(value: str) -> None:
    with pytest.raises(ConfigurationError, match="give all, none, or user names"):
        config_from_args(parse_args(["--users", "u", "--exclusive_users", value]))


@pytest.mark.usefixtures("users")
def test_a_bad_exclusive_users_stops_the_scheduler_saying_why(tmp_path: Path) -> None:
    done = scheduler_cli(
        "-n", "127.0.0.1:1", "--users", str(tmp_path / "users"),
        "--exclusive_users", "alice;bob",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--exclusive_users 'alice;bob'" in lines[0], lines
    assert "--exclusive_users" in scheduler_cli("--help").stdout
