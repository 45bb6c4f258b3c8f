"""Jobs that kill their own worker: the job ends Terminated saying how, the node
runs the next jobs. Real node processes started from the command line."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from tests.nodeproc import running_node

pytestmark = pytest.mark.slow

MiB = 1 << 20


def die(how: str) -> str:
    import os
    import signal

    if how == "exit":
        os._exit(3)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "memory":
        blocks = []
        while True:  # touched, so resident: the cgroup's OOM killer ends it
            blocks.append(bytearray(os.urandom(1)) * (16 << 20))
    return how


def test_a_job_that_kills_its_worker_says_how_and_the_node_runs_on(tmp_path):
    with (
        running_node(tmp_path / "node", cpus=1) as node,
        JobCluster(die, nodes=[node.spec], secret=node.secret) as cluster,
    ):
        ended = {}
        for how in ("exit", "kill", "ok"):
            job = cluster.submit(how)
            job()
            ended[how] = (job.status, job.exception)
    assert ended["exit"][0] == DispyJob.Terminated
    assert "exited with status 3" in ended["exit"][1]
    assert ended["kill"][0] == DispyJob.Terminated
    assert "killed by SIGKILL (9)" in ended["kill"][1]
    assert ended["ok"] == (DispyJob.Finished, None)


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A new memory cgroup (v1, or v2 where ``memory`` is delegated) limited to
    ``limit`` bytes, under this process's; skips the test where none can be made."""
    if os.geteuid() != 0:
        pytest.skip("making a memory cgroup needs root")
    name = f"dispynb-test-{secrets.token_hex(4)}"
    path = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, own = line.split(":", 2)
        if "memory" in controllers.split(","):
            path, limit_file = (
                Path("/sys/fs/cgroup/memory", own.lstrip("/")),
                ("memory.limit_in_bytes"),
            )
        elif controllers == "" and path is None:
            path, limit_file = Path("/sys/fs/cgroup", own.lstrip("/")), "memory.max"
    if path is None:
        pytest.skip("no memory cgroup hierarchy")
    cgroup = path / name
    try:
        cgroup.mkdir()
        (cgroup / limit_file).write_text(str(limit))
    except OSError as exc:
        with contextlib.suppress(OSError):
            cgroup.rmdir()
        pytest.skip(f"cannot make a memory cgroup with a limit here: {exc}")
    try:
        yield cgroup
    finally:
        with contextlib.suppress(OSError):
            cgroup.rmdir()  # empty once the node stopped


def test_a_job_the_out_of_memory_killer_ends_says_it_ran_out_of_memory(tmp_path):
    """The node runs in a memory cgroup, as under a batch system or a container;
    a job outgrows it and the kernel SIGKILLs its worker. Before, the job said only
    'killed by SIGKILL (9)'."""
    with memory_cgroup(400 * MiB) as cgroup:
        enter = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh"]
        with (
            running_node(tmp_path / "node", cpus=1, launcher=enter) as node,
            JobCluster(die, nodes=[node.spec], secret=node.secret) as cluster,
        ):
            job = cluster.submit("memory")
            job()
            after = cluster.submit("ok")
            assert after() == "ok"  # the node runs on
    assert job.status == DispyJob.Terminated
    assert "killed by SIGKILL (9)" in job.exception
    assert "out-of-memory killer" in job.exception
    assert "peak resident memory" in job.exception
