"""`dispynb.deploy.SlurmNodes` against a real SLURM (munged, slurmctld, three slurmd
on namespace hosts h1-h3, the controller and the client program on h4): nodes
submitted with ``sbatch`` register and run jobs with the job's CPUs, memory and
directives, the secret shows in no command line, script or readable file, `scale`
and `close` end the jobs, and a node that SLURM kills at its walltime loses its
reentrant jobs to the others."""

from __future__ import annotations

import json
import os
import stat
import time
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost import slurm
from tests.multihost.launched import node_pids
from tests.multihost.netns import Client, Network, start_client, wait_for

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def slurm_setup(network: Network) -> Iterator[slurm.SlurmSetup]:
    reason = slurm.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with slurm.slurm_cluster(network, network.hosts[-1], network.hosts[:-1]) as setup:
        yield setup


@pytest.fixture
def cluster_env(
    slurm_setup: slurm.SlurmSetup, monkeypatch: pytest.MonkeyPatch
) -> slurm.SlurmSetup:
    """SLURM_CONF in this process's environment: client programs inherit it."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_setup.config))
    return slurm_setup


def squeue_states(
    network: Network, setup: slurm.SlurmSetup, job_ids: list[str]
) -> dict[str, str]:
    out = slurm.slurm_command(
        network, network.hosts[-1], setup, "squeue", "--noheader", "--states=all",
        f"--jobs={','.join(job_ids)}", "--format=%i %T",
    ).stdout  # fmt: skip
    return dict(line.split() for line in out.splitlines() if line.strip())


def wait_file(
    path: Path, client: Client, setup: slurm.SlurmSetup, timeout: float, what: str
) -> dict[str, object]:
    """Wait for the client program to write ``path`` (JSON); fail, saying what the
    client and SLURM logged, if it exits or takes longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("}")):
        if client.proc.poll() is not None or time.monotonic() > deadline:
            if client.proc.poll() is None:
                client.proc.kill()
            _out, err = client.proc.communicate()  # (stop() would discard it)
            raise AssertionError(
                f"{what}: not within {timeout} s\n{err}\n{setup.logs()}"
            )
        time.sleep(0.05)
    data: dict[str, object] = json.loads(path.read_text())
    return data


CLIENT = """
import json
import logging
import os
import sys
import time

import dispynb
from dispynb.deploy import SlurmNodes

logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(name)s %(levelname)s %(message)s")


def where(x):
    import time
    time.sleep(0.2)
    return x * x, dispy_node_name, dispy_node_ip_addr


def main(args):
    nodes = SlurmNodes(
        2, cpus=2, memory="500M", walltime="10", partition="debug",
        directives=["--comment=dispynb-test"], log_directory=args["logs"],
    )
    with nodes:
        nodes.wait_for(2, 60)
        with open(args["ready"], "w") as out:
            json.dump({"jobs": [j.job_id for j in nodes.jobs],
                       "secret": nodes.secret.decode(),
                       "script": nodes.job_script()}, out)
        deadline = time.monotonic() + 60
        while not os.path.exists(args["go"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        cluster = dispynb.JobCluster(where, nodes=nodes)
        jobs = [cluster.submit(i) for i in range(8)]
        results = [job() for job in jobs]
        cpus = {n.name: n.cpus for n in nodes.nodes}
        cluster.close()
        nodes.scale(3)
        nodes.wait_for(3, 60)
        three = sorted(n.host for n in nodes.nodes)
        nodes.scale(1)  # no cluster uses them: two are stopped (scancel) at once
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(
            e.action == "stopped" for e in nodes.events
        ) < 2:
            time.sleep(0.1)
        one = len(nodes.nodes)
        scaled_down = sorted(j.state for j in nodes.jobs)
        job_ids = [j.job_id for j in nodes.jobs]
    return {
        "squares": [r[0] for r in results],
        "names": sorted({r[1] for r in results}),
        "ips": sorted({r[2] for r in results}),
        "cpus": sorted(cpus.values()),
        "three": three, "one": one, "scaled_down": scaled_down,
        "jobs": job_ids, "exited": nodes.exited(),
    }
"""


def test_slurm_nodes_run_jobs_scale_and_close(
    network: Network, cluster_env: slurm.SlurmSetup, tmp_path: Path
) -> None:
    setup = cluster_env
    ready, go, logs = tmp_path / "ready.json", tmp_path / "go", tmp_path / "logs"
    logs.mkdir()
    args = {"ready": str(ready), "go": str(go), "logs": str(logs)}
    client = start_client(network, network.hosts[-1], tmp_path, CLIENT, args)
    try:
        info = wait_file(ready, client, setup, 90, "two SLURM nodes registered")
        job_ids = list(info["jobs"])  # type: ignore[call-overload]
        secret = str(info["secret"])
        check_secret_is_hidden(network, setup, job_ids, secret, logs)
        check_job_resources(network, setup, job_ids[0])
        go.touch()
        result = client.result(150)
    finally:
        client.stop()
    assert result["squares"] == [i * i for i in range(8)]
    assert len(result["names"]) == 2
    assert all(name.startswith("slurm-") for name in result["names"])
    node_ips = {h.ip for h in network.hosts[:-1]}
    assert set(result["ips"]) <= node_ips and len(result["ips"]) == 2
    assert result["cpus"] == [2, 2]  # the job's CPUs (--cpus-per-task)
    assert result["three"] == sorted(node_ips)  # one job per slurmd: 2 CPUs each
    assert result["one"] == 1
    assert result["scaled_down"] == ["CANCELLED", "CANCELLED", "RUNNING"]
    # close() cancelled the last one; SLURM ended every node server
    states = squeue_states(network, setup, result["jobs"])
    assert set(states.values()) == {"CANCELLED"}, states
    for host in network.hosts[:-1]:
        wait_for(lambda host=host: node_pids(host) == [], 30, f"no node on {host.ip}")
    assert "submitted node slurm-0-" in client.stderr
    # the nodes' output went to log_directory
    outputs = sorted(logs.glob("dispynb-node-*.out"))
    assert len(outputs) == 3, outputs
    assert "registered with the client at" in outputs[0].read_text()


def check_secret_is_hidden(
    network: Network,
    setup: slurm.SlurmSetup,
    job_ids: list[str],
    secret: str,
    logs: Path,
) -> None:
    """No command line, job script, environment of the node or readable file holds
    the secret; the jobs' environment file in slurmctld's state is root's alone."""
    needle = secret.encode()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert needle not in cmdline, cmdline
    for job_id in job_ids:
        script = slurm.slurm_command(
            network, network.hosts[-1], setup, "scontrol", "write", "batch_script",
            job_id, "-",
        )  # fmt: skip
        assert script.returncode == 0, script.stderr
        assert "--secret-stdin" in script.stdout
        assert secret not in script.stdout
    # The node server and its jobs' processes do not have it in their environment.
    nodes = [pid for host in network.hosts[:-1] for pid in node_pids(host)]
    assert nodes
    for pid in nodes:
        assert needle not in Path(f"/proc/{pid}/environ").read_bytes()
    # Files: only root may read those holding it (SLURM's job state).
    holding = []
    for directory in (setup.directory, logs):
        for path in directory.rglob("*"):
            if path.is_file() and not path.is_socket():
                try:
                    content = path.read_bytes()
                except OSError:
                    continue
                if needle in content:
                    holding.append(path)
    for path in holding:
        assert path.stat().st_uid == 0
        assert not path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO), path
        assert setup.directory / "ctld" in path.parents, path


def check_job_resources(network: Network, setup: slurm.SlurmSetup, job_id: str) -> None:
    shown = slurm.slurm_command(
        network, network.hosts[-1], setup, "scontrol", "show", "job", job_id
    ).stdout
    for expected in (
        "JobState=RUNNING",
        "NumCPUs=2",
        "mem=500M",
        "TimeLimit=00:10:00",
        "Partition=debug",
        "Comment=dispynb-test",
        "JobName=slurm-0-",
    ):
        assert expected in shown, shown


WALLTIME_CLIENT = """
import json
import logging
import sys
import time

import dispynb
from dispynb.deploy import SlurmNodes

logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(name)s %(levelname)s %(message)s")


def work(x, doomed, flag):
    import os, time
    if dispy_node_name == doomed:
        time.sleep(600)  # until SLURM ends this node's batch job
    while not os.path.exists(flag):  # until the doomed node holds jobs too
        time.sleep(0.05)
    return x, dispy_node_name


def main(args):
    with SlurmNodes(2, cpus=1, walltime="10", log_directory=args["logs"]) as nodes:
        nodes.wait_for(2, 60)
        doomed = nodes.nodes[0].name
        job_id = next(j.job_id for j in nodes.jobs if j.name == doomed)
        cluster = dispynb.JobCluster(work, nodes=nodes, reentrant=True)
        jobs = [cluster.submit(i, doomed, args["flag"]) for i in range(8)]
        deadline = time.monotonic() + 60
        while not any(j.status == dispynb.DispyJob.Running and j.ip_addr and
                      j.ip_addr == nodes.nodes[0].host for j in jobs):
            assert time.monotonic() < deadline, "no job ran on the doomed node"
            time.sleep(0.05)
        open(args["flag"], "w").close()
        with open(args["ready"], "w") as out:
            json.dump({"job": job_id, "doomed": doomed}, out)
        results = [job() for job in jobs]
        statuses = sorted({job.status for job in jobs})
        deadline = time.monotonic() + 30  # squeue is read every 2 s
        while not nodes.exited() and time.monotonic() < deadline:
            time.sleep(0.1)
        exited = nodes.exited()
        cluster.close()
    failures = [(job.status, str(job.exception)[-600:]) for job in jobs
                if job.status != dispynb.DispyJob.Finished]
    return {"results": results, "doomed": doomed, "exited": exited,
            "failures": failures,
            "statuses": statuses, "finished": dispynb.DispyJob.Finished}
"""


@pytest.mark.timeout(300)
def test_a_node_killed_at_its_walltime_loses_its_jobs_to_the_others(
    network: Network, cluster_env: slurm.SlurmSetup, tmp_path: Path
) -> None:
    """SLURM's own walltime enforcement (TimeLimit lowered to its minimum, 1 minute,
    with ``scontrol update`` once the node holds jobs): SLURM sends SIGTERM, then
    SIGKILL after KillWait; the reentrant jobs the node held finish on the other."""
    setup = cluster_env
    ready = tmp_path / "ready.json"
    client = start_client(
        network,
        network.hosts[-1],
        tmp_path,
        WALLTIME_CLIENT,
        {"ready": str(ready), "flag": str(tmp_path / "flag"), "logs": str(tmp_path)},
    )
    try:
        info = wait_file(ready, client, setup, 90, "a job running on the doomed node")
        update = slurm.slurm_command(
            network, network.hosts[-1], setup, "scontrol", "update",
            f"JobId={info['job']}", "TimeLimit=1",
        )  # fmt: skip
        assert update.returncode == 0, update.stderr
        result = client.result(240)
    finally:
        client.stop()
    doomed = result["doomed"]
    assert result["failures"] == []
    assert sorted(x for x, _ in result["results"]) == list(range(8))
    assert all(name != doomed for _, name in result["results"])
    assert result["statuses"] == [result["finished"]]
    assert any(
        f"({doomed}: SLURM job {info['job']} TIMEOUT" in line
        for line in result["exited"]
    ), result["exited"]
    assert f"node {doomed} ended: SLURM job {info['job']} TIMEOUT" in client.stderr
    shown = slurm.slurm_command(
        network, network.hosts[-1], setup, "scontrol", "show", "job", str(info["job"])
    ).stdout
    assert "JobState=TIMEOUT" in shown and "Reason=TimeLimit" in shown, shown


MAGIC_CLIENT = """
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

WHERE = "def where(x):\\n    return dispy_node_name\\n"


def main(args):
    import os

    os.chdir(args["cwd"])  # the notebook's directory: SLURM writes slurm-<id>.out there
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "dispynb")
    with capture_output() as started:
        shell.run_line_magic(
            "dispy",
            "slurm --nodes 2 --cpus 1 --memory 200M --walltime 5 "
            "--partition debug --directive=--comment=from-a-notebook",
        )
    jobs = [j.job_id for j in shell.user_ns["get_ipython"]().magics_manager
            .registry["DispyMagics"].session.local.jobs]
    with capture_output():
        shell.run_cell_magic("dispy", '--over "range(6)" --into placed', WHERE)
    names = shell.user_ns["placed"].results
    with capture_output() as closed:
        shell.run_line_magic("dispy", "close")
    return {"started": started.stdout, "names": names, "jobs": jobs,
            "closed": closed.stdout}
"""


def test_dispy_slurm_magic(
    network: Network, cluster_env: slurm.SlurmSetup, tmp_path: Path
) -> None:
    """``%dispy slurm --nodes 2 ...`` in an IPython shell, a ``%%dispy`` cell on the
    batch jobs' nodes, then ``%dispy close`` cancels the jobs."""
    args = {"cwd": str(tmp_path)}
    client = start_client(network, network.hosts[-1], tmp_path, MAGIC_CLIENT, args)
    try:
        result = client.result(120)
    finally:
        client.stop()
    assert result["started"].startswith("dispynb: slurm nodes 10.77.0."), result
    assert result["started"].count("10.77.0.") == 2  # both jobs' nodes registered
    names = result["names"]
    assert len(names) == 6 and all(name.startswith("slurm-") for name in names)
    states = squeue_states(network, cluster_env, result["jobs"])
    assert set(states.values()) == {"CANCELLED"}, states
    for job_id in result["jobs"]:
        shown = slurm.slurm_command(
            network, network.hosts[-1], cluster_env, "scontrol", "show", "job", job_id
        ).stdout
        assert "Comment=from-a-notebook" in shown and "TimeLimit=00:05:00" in shown
    for host in network.hosts[:-1]:
        wait_for(lambda host=host: node_pids(host) == [], 30, f"no node on {host.ip}")
    assert len(list(tmp_path.glob("slurm-*.out"))) == 2  # SLURM's default output


EXIT_CLIENT = """
from dispynb.deploy import SlurmNodes


def main(args):
    nodes = SlurmNodes(2, cpus=1, walltime="10", log_directory=args["logs"])
    nodes.wait_for(2, 60)
    return [job.job_id for job in nodes.jobs]  # then exits without close()
"""


def test_jobs_of_a_launcher_not_closed_are_cancelled_at_exit(
    network: Network, cluster_env: slurm.SlurmSetup, tmp_path: Path
) -> None:
    """A script (or a kernel) that ends without closing its SlurmNodes does not leave
    its batch jobs holding the allocation until their walltime."""
    client = start_client(
        network, network.hosts[-1], tmp_path, EXIT_CLIENT, {"logs": str(tmp_path)}
    )
    try:
        job_ids = client.result(90)
    finally:
        client.stop()
    assert len(job_ids) == 2
    wait_for(
        lambda: (
            set(squeue_states(network, cluster_env, job_ids).values()) == {"CANCELLED"}
        ),
        30,
        "the jobs cancelled",
    )
    for host in network.hosts[:-1]:
        wait_for(lambda host=host: node_pids(host) == [], 30, f"no node on {host.ip}")


ERRORS_CLIENT = """
from dispynb.deploy import LaunchError, SlurmNodes


def main(args):
    messages = []
    try:
        SlurmNodes(1, partition="nosuchpartition")
    except LaunchError as exc:
        messages.append(str(exc))
    nodes = SlurmNodes(1, directives=["--begin=now+1hour"], wait=3)
    try:
        nodes.node_specs()
    except LaunchError as exc:
        messages.append(str(exc))
    finally:
        nodes.close()
    for python in ("/nonexistent/python", args["bare"]):
        nodes = SlurmNodes(1, python=python, wait=60)
        try:
            nodes.node_specs()
        except LaunchError as exc:
            messages.append(str(exc))
        finally:
            nodes.close()
    return messages
"""


def test_refused_queued_and_failed_jobs_are_explained(
    network: Network, cluster_env: slurm.SlurmSetup, tmp_path: Path
) -> None:
    bare = tmp_path / "bare"  # a Python of the right version, without dispynb's
    venv.EnvBuilder(with_pip=False).create(bare)  # dependencies (msgpack...)
    messages = start_client(
        network,
        network.hosts[-1],
        tmp_path,
        ERRORS_CLIENT,
        {"bare": f"{bare}/bin/python"},
    ).result(90)
    assert len(messages) == 4, messages
    refused, queued, failed, lacking = messages
    assert "sbatch refused node slurm-0-" in refused
    assert "invalid partition" in refused.lower(), refused
    assert "did not register" in queued and "(BeginTime)" in queued, queued
    assert "give wait= more seconds" in queued
    # A node that cannot start: what its job printed (in slurm-<jobid>.out, in the
    # client's directory), not only 'FAILED (NonZeroExitCode)'.
    assert "exited before registering" in failed and "FAILED" in failed, failed
    assert f"{tmp_path}/slurm-" in failed and ".out ends: " in failed, failed
    assert "/nonexistent/python: not found" in failed, failed
    # A Python without what dispynb needs (the cluster's default python3, not the
    # user's environment): the job's last line, then what to do.
    assert "No module named 'msgpack'" in lacking, lacking
    assert lacking.endswith(
        f"msgpack is not installed for {bare}/bin/python on the nodes; install "
        "dispynb there, or give python= the Python that has it). Check the nodes' "
        "log records above (logger dispynb.deploy), that dispynb is installed "
        "where they run, and that they can reach this address (register_host=)"
    ), lacking


KILLED_CLIENT = """
import json
import threading

import dispynb
from dispynb.deploy import SlurmNodes


def square(x):
    return x * x


def main(args):
    nodes = SlurmNodes(
        2, cpus=1, walltime="10", log_directory=args["logs"],
        exit_without_client=args["alone"],
    )
    nodes.wait_for(2, 60)
    cluster = dispynb.JobCluster(square, nodes=nodes)
    assert [job() for job in [cluster.submit(i) for i in range(4)]] == [0, 1, 4, 9]
    with open(args["ready"], "w") as out:
        json.dump({"jobs": [j.job_id for j in nodes.jobs]}, out)
    threading.Event().wait()  # until SIGKILL: no close(), no scancel at exit
"""


def test_nodes_of_a_killed_client_end_their_jobs(
    network: Network, cluster_env: slurm.SlurmSetup, tmp_path: Path
) -> None:
    """A client killed with SIGKILL cancels nothing: its nodes notice that no client
    is connected (``--exit-without-client``, passed by SlurmNodes) and end their
    batch jobs instead of holding the allocation until the walltime."""
    ready = tmp_path / "ready.json"
    client = start_client(
        network, network.hosts[-1], tmp_path, KILLED_CLIENT,
        {"logs": str(tmp_path), "alone": 3, "ready": str(ready)},
    )  # fmt: skip
    try:
        job_ids = wait_file(ready, client, cluster_env, 120, "nodes used")["jobs"]
        assert isinstance(job_ids, list) and len(job_ids) == 2
        assert set(squeue_states(network, cluster_env, job_ids).values()) == {"RUNNING"}
    finally:
        client.stop()  # SIGKILL
    wait_for(
        lambda: (
            set(squeue_states(network, cluster_env, job_ids).values()) == {"COMPLETED"}
        ),
        60,
        "the jobs of the killed client's nodes completed",
    )
    for job_id in job_ids:
        log = (tmp_path / f"dispynb-node-{job_id}.out").read_text()
        assert "(--exit-without-client)" in log, log
    for host in network.hosts[:-1]:
        wait_for(lambda host=host: node_pids(host) == [], 30, f"no node on {host.ip}")


SHADOWED_CLIENT = """
import os

import dispynb
from dispynb.deploy import SlurmNodes


def square(x):
    return x * x


def main(args):
    os.chdir(args["cwd"])  # sbatch's directory: the batch job starts in it
    with SlurmNodes(1, cpus=1, walltime="5") as nodes:
        nodes.wait_for(1, 60)
        with dispynb.JobCluster(square, nodes=nodes) as cluster:
            return cluster.submit(9)()
"""


def test_a_users_module_in_the_submit_directory_shadows_none_of_ours(
    network: Network, cluster_env: slurm.SlurmSetup, tmp_path: Path
) -> None:
    """The batch job starts in sbatch's directory; ``python -m nodeserver`` put it
    first on the node's path, where a user's ``dispynb.py`` or ``msgpack.py`` was
    imported instead of ours: the node exited before registering."""
    work = tmp_path / "work"
    work.mkdir()
    for module in ("dispynb", "nodeserver", "msgpack"):
        (work / f"{module}.py").write_text(
            f"raise SystemExit('the user\\'s {module}.py was imported')\n"
        )
    client = start_client(
        network, network.hosts[-1], tmp_path, SHADOWED_CLIENT, {"cwd": str(work)}
    )
    try:
        assert client.result(120) == 81, client.stderr
    finally:
        client.stop()
