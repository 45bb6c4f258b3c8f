"""Attacks that fish for the shared secret: errors, logs, files of a real node."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest

from dispynb import DispyJob, JobCluster
from dispynb.errors import DispynbError
from tests import jobs
from tests.hostile.tools import AS_NOBODY, limited_node, strong_secret
from tests.nodeproc import node_env, start_node
from tests.sharedsched.harness import SchedulerProcess, add_user

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


def _look_for(secret: str, proc_file: str = "environ") -> list[str]:
    """Where a job finds ``secret``: its environment, a child's, its ancestors'
    /proc/PID/environ (the environment each started with), or with ``proc_file``
    ``"cmdline"`` only their command lines."""
    import os
    import subprocess

    where = []
    if proc_file == "environ" and secret in str(os.environ):
        where.append("os.environ")
    if proc_file == "environ":
        env = subprocess.run(["env"], capture_output=True, text=True, check=False)
        if secret in env.stdout:
            where.append("the env command's output")
    pid = os.getpid()
    while pid > 1:
        try:
            with open(f"/proc/{pid}/{proc_file}", "rb") as handle:
                if secret.encode() in handle.read():
                    where.append(f"/proc/{pid}/{proc_file}")
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


def _read_memory_of(reversed_secret: str) -> dict[str, str]:
    """What a job finds of its node's secret (given reversed, so that the processes
    it travels through do not hold it) in the memory and /proc/PID/environ of each
    of its ancestors of its own user (its computation process, the zygote, the node)
    and in its own Python frames: per place, "found", "absent" or why it could not
    be read."""
    import os
    import sys

    from tests.hostile.tools import memory_regions

    secret = reversed_secret[::-1].encode()
    found: dict[str, str] = {}
    frame = sys._getframe(1)  # the worker's frames, down to how it was forked
    while frame is not None:
        if any(secret.decode() in repr(v) for v in frame.f_locals.values()):
            found[f"frame {frame.f_code.co_name}"] = "found"
        frame = frame.f_back

    def environ_holds(pid: int) -> bool:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return secret in environ.read()

    def memory_holds(pid: int) -> bool:
        return any(secret in region for region in memory_regions(pid))

    pid, me = os.getppid(), os.getuid()
    for role in ("computation process", "zygote", "node"):
        # A non-dumpable process's /proc files belong to root: its user is read
        # from its status (real uid).
        with open(f"/proc/{pid}/status") as handle:
            uid = next(int(ln.split()[1]) for ln in handle if ln.startswith("Uid:"))
        if uid != me:
            break
        for what, look in (("environ", environ_holds), ("memory", memory_holds)):
            try:
                found[f"{role} {what}"] = "found" if look(pid) else "absent"
            except OSError as exc:
                found[f"{role} {what}"] = exc.strerror or type(exc).__name__
        with open(f"/proc/{pid}/stat") as handle:
            pid = int(handle.read().rsplit(")", 1)[1].split()[1])
    return found


@pytest.mark.attack(
    id="secret-in-node-memory",
    title="A job of a node run as nobody reads the memory and /proc/PID/environ of "
    "its computation process, the zygote and the node, and its own inherited "
    "frames, for the secret (given in DISPYNB_SECRET, or in --secret-file)",
    goal="found nowhere: the node's and the zygote's memory and environ refused "
    "(was: read from the node's memory; from DISPYNB_SECRET also in the zygote's, "
    "the computation process's and the job's own frames)",
)
@pytest.mark.parametrize("source", ["env", "file"])
@pytest.mark.timeout(120)
def test_a_job_cannot_read_the_secret_from_its_node(source, measure, tmp_path):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running a node as another user needs root and setpriv")
    # Sticky, as /tmp: a node refuses a --dest-path under one anyone may rename.
    os.chmod(tmp_path, 0o1777)
    secret = strong_secret()
    node = start_node(
        tmp_path / "node", secret=secret, secret_in_env=source == "env",
        launcher=AS_NOBODY,
    )  # fmt: skip
    try:
        with JobCluster(_read_memory_of, nodes=[node.spec], secret=secret) as cluster:
            job = cluster.submit(secret[::-1])
            places = job()
    finally:
        node.stop()
    assert job.status == DispyJob.Finished, job.exception
    found = sorted(place for place, what in places.items() if what == "found")
    refused = sorted(p for p, what in places.items() if what not in ("found", "absent"))
    measure(
        f"{source}: found in {found or 'nothing'}; refused: "
        f"{', '.join(refused) or 'nothing'} ({len(places)} places looked at)"
    )
    assert found == []
    assert {"node memory", "node environ", "zygote memory"} <= set(refused)


def _look_in_command_lines(secret: str) -> list[str]:
    """Where a job finds ``secret``: the command lines (/proc/PID/cmdline) of its
    worker and its ancestors, and the worker's ``sys.argv`` and ``sys.orig_argv``."""
    import sys

    where = [
        name for name in ("argv", "orig_argv") if secret in str(getattr(sys, name))
    ]
    return where + _look_for(secret, "cmdline")


@pytest.mark.attack(
    id="secret-in-command-line",
    title="A node started as dispy's are, with -s/--secret on its command line: "
    "another user reads the process list, a job its own and its ancestors' "
    "command lines and sys.orig_argv",
    goal="the secret shown as *** once the node has started (was: in every "
    "command line of the node, its zygote, computation processes and workers)",
)
@pytest.mark.parametrize("form", ["--secret", "--secret=", "-s"])
def test_a_secret_on_the_command_line_is_masked(measure, tmp_path, form):
    secret = strong_secret()
    given = [form + secret] if form != "--secret" else [form, secret]
    node = start_node(tmp_path / "node", *given, secret_in_env=True)
    try:
        with open(f"/proc/{node.proc.pid}/cmdline", "rb") as handle:
            shown = handle.read().replace(b"\0", b" ").decode()
        with JobCluster(_look_in_command_lines, nodes=[node.spec], secret=secret) as c:
            job = c.submit(secret)
            found = job()
    finally:
        node.stop()
    listed = [f"the node's /proc/{node.proc.pid}/cmdline"] if secret in shown else []
    measure(f"{form}: process list shows '{shown.split('nodeserver ')[-1][:70]}...'; "
            f"the job found it in {found or 'nothing'}")  # fmt: skip
    assert job.status == DispyJob.Finished, job.exception
    assert listed + found == []


def test_a_secret_on_dispynb_runs_command_line_is_masked(tmp_path):
    """``dispynb run --secret VALUE`` (dispy_cmd.py's way): another user read the
    secret in the process list while the runs went on."""
    secret = strong_secret()
    node = start_node(tmp_path / "node", secret=secret)
    program = tmp_path / "wait.sh"
    program.write_text("#!/bin/sh\nsleep 3\n")
    program.chmod(0o755)
    command = [sys.executable, "-m", "dispynb.cli", "run", "-n", node.spec]
    run = subprocess.Popen(
        [*command, "--secret", secret, "wait.sh"],
        cwd=tmp_path,
        env=node_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        shown = b""  # what it shows last, as its job runs (3 s)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                open(f"/proc/{run.pid}/cmdline", "rb") as f,
            ):
                shown = f.read() or shown  # (empty once it exited)
            if run.poll() is not None:
                break
            time.sleep(0.05)
        assert run.wait(60) == 0
    finally:
        run.kill()
        node.stop()
    assert b"--secret\0" + b"*" * len(secret) in shown, shown


def test_a_node_secret_on_the_schedulers_command_line_is_masked(tmp_path):
    """``dispynb-scheduler --node_secret VALUE``: every user of the machine, the
    scheduler's own users among them (who are not to know the node secret: with it
    they reach the nodes past their quotas), read it in the process list."""
    secret = strong_secret()
    add_user(tmp_path, "alice")
    scheduler = SchedulerProcess(
        tmp_path, [], secret, args=("--node_secret", secret)
    ).start()
    try:
        assert scheduler.proc is not None
        with open(f"/proc/{scheduler.proc.pid}/cmdline", "rb") as handle:
            shown = handle.read()
    finally:
        scheduler.stop()
    assert secret.encode() not in shown
    assert b"--node_secret\0" + b"*" * len(secret) in shown, shown
