"""The deploying guide's shared scheduler for a lab, its commands run as written:
``dispynb-scheduler`` with TLS and ``--register_port`` on h4 (SLURM's login host),
a node started by hand on h1, two started by ``sbatch`` of the guide's script on a
real SLURM (h1-h3). A user's reentrant jobs run on them; a node's batch job
cancelled with ``scancel`` while it runs a job: the job finishes on another node,
and the scheduler says the node went."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.multihost import slurm
from tests.multihost.netns import Network, start_client
from tests.multihost.test_slurm import cluster_env, slurm_setup
from tests.nodeproc import ROOT, node_env
from tests.transport.certs import make_cert

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(240)]

__all__ = ["cluster_env", "slurm_setup"]

GUIDE = ROOT / "docs" / "howto" / "deploy-nodes.md"

#: The guide's scheduler address, replaced by the namespace host's.
GUIDE_ADDRESS = "10.0.0.1"


def guide_blocks() -> list[str]:
    """The shell blocks of the guide's shared-scheduler section, lines continued
    with a backslash joined."""
    text = GUIDE.read_text()
    start = text.index("## Or for a shared scheduler")
    section = text[start : text.index("\n## ", start + 1)]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [block.replace("\\\n", " ") for block in blocks]


CLIENT = """
import dispynb


def work(seconds, folder):
    import os, time
    job = os.environ.get("SLURM_JOB_ID", "by-hand")
    open(os.path.join(folder, "started-%s-%d" % (job, os.getpid())), "w").close()
    time.sleep(seconds)
    return job


def main(args):
    cluster = dispynb.SharedJobCluster(
        work, scheduler_host=args["address"], secret_file=args["credential"],
        cafile=args["cafile"], reentrant=True,
    )
    jobs = [cluster.submit(args["seconds"], args["folder"]) for _ in range(3)]
    results = [job() for job in jobs]
    statuses = [int(job.status) for job in jobs]
    cluster.close()
    return {"results": results, "statuses": statuses}
"""


def test_the_guides_lab_scheduler_with_slurm_nodes(
    network: Network, cluster_env: slurm.SlurmSetup, tmp_path: Path
) -> None:
    setup, login, by_hand = cluster_env, network.hosts[-1], network.hosts[0]
    commands, node_command, script = guide_blocks()
    env = {
        **node_env(),
        **setup.env,
        "HOME": str(tmp_path),  # the guide's ~
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }

    def shell(host_index: int, command: str) -> list[str]:
        command = command.replace(GUIDE_ADDRESS, login.ip)
        return network.hosts[host_index].command(["sh", "-c", command])

    make_cert(tmp_path, "sched", ips=(login.ip,))
    *setting_up, scheduler_command = [c for c in commands.splitlines() if c.strip()]
    for command in setting_up:
        done = subprocess.run(
            shell(-1, command), env=env, cwd=tmp_path, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{command}: {done.stderr}"
    log = tmp_path / "scheduler.log"
    started: list[subprocess.Popen[bytes]] = []
    job_ids: list[str] = []

    def start(host_index: int, command: str, output: Path) -> None:
        with open(output, "ab") as handle:
            started.append(
                subprocess.Popen(
                    shell(host_index, command),
                    env=env,
                    cwd=tmp_path,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

    def nodes_up(count: int) -> None:
        deadline = time.monotonic() + 90
        while log.read_text().count("is up with") < count:
            assert started[0].poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"{log.read_text()}\n{setup.logs()}"
            time.sleep(0.1)

    try:
        start(-1, scheduler_command, log)
        start(by_hand.index - 1, node_command, tmp_path / "by-hand.log")
        nodes_up(1)
        (tmp_path / "node.sh").write_text(
            script.replace("--cpus-per-task=8", "--cpus-per-task=1").replace(
                GUIDE_ADDRESS, login.ip
            )
        )
        for _ in range(2):
            done = subprocess.run(
                login.command(["sbatch", "--parsable", "node.sh"]),
                env=env, cwd=tmp_path, capture_output=True, text=True,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            job_ids.append(done.stdout.strip().split(";")[0])
        nodes_up(3)
        folder = tmp_path / "started"
        folder.mkdir()
        client = start_client(
            network, login, tmp_path / "client", CLIENT,
            {"address": login.ip, "credential": str(tmp_path / "alice.credential"),
             "cafile": str(tmp_path / "sched.pem"), "seconds": 15,
             "folder": str(folder)},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            running: list[str] = []
            while not running:
                assert client.proc.poll() is None, client.result(1)
                assert time.monotonic() < deadline, log.read_text()
                running = [
                    job for job in job_ids for f in os.listdir(folder)
                    if f.startswith(f"started-{job}-")
                ]  # fmt: skip
                time.sleep(0.05)
            cancelled = running[0]
            done = subprocess.run(
                login.command(["scancel", cancelled]), env=env, capture_output=True
            )
            assert done.returncode == 0, done.stderr
            result = client.result(120)
        finally:
            client.stop()
    finally:
        if job_ids:
            subprocess.run(login.command(["scancel", *job_ids]), env=env, check=False)
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    assert result["statuses"] == [11, 11, 11], json.dumps(result)  # Finished
    assert cancelled not in result["results"], (cancelled, result, text)
    # SLURM's SIGTERM: the node says it stops (a vanished one 'is down').
    assert re.search(r"node \S+ (stopped|is down): ", text), text
    assert "listening for node registrations" in text or "9714" in text, text
