"""Attacks that fish for the shared secret: errors, logs, files of a real node."""

from __future__ import annotations

import logging

import pytest

from dispynb import DispyJob, JobCluster
from dispynb.errors import DispynbError
from tests import jobs
from tests.hostile.tools import limited_node, strong_secret

pytestmark = pytest.mark.slow


@pytest.mark.attack(
    id="secret-leak",
    title="Looking for the secret in a node's log, its files, and a client's errors",
    goal="neither the right secret nor a wrong guess appears anywhere",
)
def test_secret_never_appears_in_logs_errors_or_files(measure, tmp_path, caplog):
    secret, guess = strong_secret(), strong_secret()
    caplog.set_level(logging.DEBUG)
    with limited_node(tmp_path / "node", "--loglevel", "debug", secret=secret) as node:
        with (
            pytest.raises(DispynbError) as refused,
            JobCluster(jobs.square, nodes=[node.spec], secret=guess) as jc,
        ):
            jc.submit(3)()
        with JobCluster(jobs.square, nodes=[node.spec], secret=secret) as jc:
            assert jc.submit(3)() == 9
    texts = {
        "client error": str(refused.value) + repr(refused.value),
        "client log": "\n".join(r.getMessage() for r in caplog.records),
        "node log": node.log_text(),
    }
    for path in (tmp_path / "node").rglob("*"):
        if path.is_file() and path != node.secret_file:
            texts[str(path)] = path.read_text(errors="replace")
    leaks = [where for where, text in texts.items() if secret in text or guess in text]
    measure(f"searched {len(texts)} logs, errors and files: {len(leaks)} leaks")
    assert leaks == []


def _look_for(secret: str) -> list[str]:
    """Where a job finds ``secret``: its environment, a child's, its ancestors'
    /proc/PID/environ (the environment each started with)."""
    import os
    import subprocess

    where = []
    if secret in str(os.environ):
        where.append("os.environ")
    env = subprocess.run(["env"], capture_output=True, text=True, check=False)
    if secret in env.stdout:
        where.append("the env command's output")
    pid = os.getpid()
    while pid > 1:
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if secret.encode() in handle.read():
                    where.append(f"/proc/{pid}/environ")
        except OSError:
            pass
        with open(f"/proc/{pid}/stat") as handle:
            pid = int(handle.read().rsplit(")", 1)[1].split()[1])
    return where


@pytest.mark.attack(
    id="secret-in-job-environment",
    title="A job of a node given its secret in DISPYNB_SECRET looks for it in its "
    "environment, a child's and its ancestors' /proc/PID/environ",
    goal="found nowhere (was: in os.environ, env's output and the /proc environ of "
    "the worker, its computation process, the zygote and the node)",
)
def test_a_job_does_not_find_the_node_secret_in_its_environment(measure, tmp_path):
    # The test's own process does not have the secret in its environment: only the
    # node was given it.
    secret = strong_secret()
    with (
        limited_node(tmp_path / "node", secret=secret, secret_in_env=True) as node,
        JobCluster(_look_for, nodes=[node.spec], secret=secret) as cluster,
    ):
        job = cluster.submit(secret)
        found = job()
    measure(f"found in {found or 'nothing'}")
    assert job.status == DispyJob.Finished, job.exception
    assert found == []
