"""A ``SharedJobCluster`` client stopped (SIGSTOP: Ctrl-Z, a paused VM or notebook
kernel) longer than its scheduler's ``--zombie_interval``, then continued.

The scheduler takes it for a zombie: its running jobs are terminated, its queued
ones cancelled, its session ended. The client, running again, must say that, not
that its scheduler was lost, and go on with new jobs. A real node and scheduler
from the command line; the client a real process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dispynb import DispyJob, SharedJobCluster
from tests.chaos.onenode import scheduler_over_one_node
from tests.sharedsched.harness import env_for

pytestmark = pytest.mark.slow


def nap(n: int, seconds: float) -> int:
    import time

    time.sleep(seconds)
    return n


#: ``ADDRESS CREDENTIAL``: four long jobs on two CPUs; says ``running`` once two
#: run, then (a line on stdin) prints how they ended and a new job's result as JSON.
CLIENT = """
import json, sys, time
from dispynb import SharedJobCluster

def nap(n, seconds):
    import time
    time.sleep(seconds)
    return n

cluster = SharedJobCluster(nap, scheduler_host=sys.argv[1], secret_file=sys.argv[2])
jobs = [cluster.submit(i, 60.0) for i in range(4)]
while sum(job.status == job.Running for job in jobs) < 2:
    time.sleep(0.05)
print("running", flush=True)
sys.stdin.readline()
done = cluster.wait(timeout=30)
ended = [[int(job.status), str(job.exception)] for job in jobs]
after = cluster.submit(9, 0.0)()
cluster.close()
print(json.dumps({"done": done, "ended": ended, "after": after}), flush=True)
"""


@pytest.mark.timeout(90)
def test_a_client_thawed_after_its_scheduler_took_it_for_a_zombie_is_told_so(
    tmp_path: Path,
) -> None:
    """Before, its jobs ended 'scheduler ... was lost (connection ... closed)', or
    'its computation closed' for the queued ones: nothing said that the scheduler
    had ended them, nor why."""
    client = None
    zombie = ("--zombie_interval", "0.1")
    with scheduler_over_one_node(tmp_path, *zombie, cpus=2) as (scheduler, credential):
        try:
            client = subprocess.Popen(
                [sys.executable, "-c", CLIENT, scheduler.address, str(credential)],
                env=env_for(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            assert client.stdin is not None and client.stdout is not None
            assert client.stdout.readline().strip() == "running"
            os.killpg(client.pid, signal.SIGSTOP)
            try:
                scheduler.wait_for_log("a zombie", timeout=40)
            finally:
                os.killpg(client.pid, signal.SIGCONT)
            out, err = client.communicate("\n", timeout=60)
            assert client.returncode == 0, out + err
            seen = json.loads(out.strip().splitlines()[-1])
        finally:
            if client is not None and client.poll() is None:
                os.killpg(client.pid, signal.SIGKILL)
                client.communicate()
    assert seen["done"] and seen["after"] == 9
    said = (
        "the scheduler heard nothing from this client for {} s (its "
        "--zombie_interval is 0.1 min) and took it for gone: it terminated its "
        "running jobs and cancelled its queued ones."
    )
    for status, exception in seen["ended"]:
        assert status == DispyJob.Abandoned, seen["ended"]
        silent = exception.partition("heard nothing from this client for ")[2]
        assert said.format(silent.split(" ")[0]) in exception, exception
        assert "raise --zombie_interval" in exception


#: ``ADDRESS CREDENTIAL GO``: six jobs that each return 32 MiB once ``GO`` exists,
#: on two CPUs (the client sends the scheduler a few per CPU ahead: those return
#: some 128 MiB); as CLIENT, without the job after.
LARGE_RESULTS_CLIENT = """
import json, os, sys, time
from dispynb import SharedJobCluster

def large(n, go):
    import os, time
    while not os.path.exists(go):
        time.sleep(0.01)
    return bytes([n]) * (32 << 20)

cluster = SharedJobCluster(large, scheduler_host=sys.argv[1], secret_file=sys.argv[2])
jobs = [cluster.submit(i, sys.argv[3]) for i in range(6)]
while sum(job.status == job.Running for job in jobs) < 2:
    time.sleep(0.05)
print("running", flush=True)
sys.stdin.readline()
done = cluster.wait(timeout=30)
ended = [[int(job.status), str(job.exception)] for job in jobs]
cluster.close()
print(json.dumps({"done": done, "ended": ended}), flush=True)
"""


@pytest.mark.timeout(90)
def test_a_zombie_with_results_waiting_for_it_is_told_so_all_the_same(
    tmp_path: Path,
) -> None:
    """The client stopped, its jobs' results fill its socket and wait in
    the scheduler's backlog (past 32 MiB unsent). Before, the scheduler's word that
    it took the client for a zombie was queued behind that backlog, which went with
    the session: the client, continued, ended those jobs 'scheduler ... was lost'."""
    client = None
    go = tmp_path / "go"
    zombie = ("--zombie_interval", "0.1", "--max_sessions", "1")
    with scheduler_over_one_node(tmp_path, *zombie, cpus=2) as (scheduler, credential):
        try:
            client = subprocess.Popen(
                [sys.executable, "-c", LARGE_RESULTS_CLIENT, scheduler.address,
                 str(credential), str(go)],
                env=env_for(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
                cwd=tmp_path,
            )  # fmt: skip
            assert client.stdin is not None and client.stdout is not None
            assert client.stdout.readline().strip() == "running"
            os.killpg(client.pid, signal.SIGSTOP)
            try:
                go.touch()
                scheduler.wait_for_log("does not read what is sent to it", timeout=40)
                scheduler.wait_for_log("a zombie", timeout=40)
                # Its session waits for it to take the word, but is no longer
                # one of its user's (--max_sessions 1): a new client is served.
                with SharedJobCluster(
                    nap, scheduler_host=scheduler.address, secret_file=str(credential)
                ) as again:
                    assert again.submit(5, 0.0)() == 5
            finally:
                os.killpg(client.pid, signal.SIGCONT)
            out, err = client.communicate("\n", timeout=60)
            assert client.returncode == 0, out + err
            seen = json.loads(out.strip().splitlines()[-1])
        finally:
            if client is not None and client.poll() is None:
                os.killpg(client.pid, signal.SIGKILL)
                client.communicate()
    assert seen["done"]
    ended = seen["ended"]
    assert DispyJob.Finished in [status for status, _ in ended]  # read before
    unread = [exception for status, exception in ended if status != DispyJob.Finished]
    assert unread, ended  # those in the backlog
    for exception in unread:
        assert "took it for gone" in exception, exception
        assert "results that waited for it to read them were dropped" in exception
