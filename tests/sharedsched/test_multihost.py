"""A scheduler, three nodes and three clients on seven namespace hosts.

h1 runs ``dispynb-scheduler`` (the only holder of the node secret), h2-h4 run
``dispynb-node`` with 2 CPUs, h5-h7 run one client program each, as three users.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.netns import (
    Host,
    NetNode,
    Network,
    new_secret_file,
    start_node,
    sweep_stale,
    unavailable_reason,
)
from tests.sharedsched.harness import (
    DOOMED_CLIENT,
    TIMED_CLIENT,
    add_user,
    busy_within,
    env_for,
)

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(120)]

PROGRAMS = Path(__file__).parent / "programs"
USERS = ("alice", "bob", "carol")
SCHEDULER_PORT = 9712


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    sweep_stale()
    net = Network(7)
    with net.running():
        yield net


@pytest.fixture
def site(network: Network, tmp_path: Path) -> Iterator[dict[str, object]]:
    """Nodes on h2-h4, the scheduler on h1, credentials for three users."""
    secret, _file = new_secret_file(tmp_path)
    nodes: list[NetNode] = []
    scheduler: subprocess.Popen[bytes] | None = None
    try:
        for host in network.hosts[1:4]:
            nodes.append(start_node(network, host, tmp_path, secret, "--cpus", "2"))
        credentials = {name: add_user(tmp_path, name) for name in USERS}
        sched_host = network.hosts[0]
        log = tmp_path / "scheduler.log"
        argv = [
            sys.executable, "-m", "schedserver",
            "-i", sched_host.ip, "-p", str(SCHEDULER_PORT),
            "--users", str(tmp_path / "users"),
            "--port_file", str(tmp_path / "scheduler.port"),
        ]  # fmt: skip
        for node in nodes:
            argv += ["-n", node.spec]
        with open(log, "wb") as handle:
            scheduler = network.popen(
                sched_host,
                argv,
                env=env_for(DISPYNB_SECRET=secret),
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while log.read_text().count("is up with") < len(nodes):
            assert scheduler.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        yield {
            "address": f"{sched_host.ip}:{SCHEDULER_PORT}",
            "credentials": credentials,
            "nodes": nodes,
            "log": log,
        }
    finally:
        if scheduler is not None and scheduler.poll() is None:
            scheduler.terminate()
            try:
                scheduler.wait(20)
            except subprocess.TimeoutExpired:
                scheduler.kill()
                scheduler.wait()
        for node in nodes:
            node.stop()


def run_in(
    network: Network, host: Host, argv: list[str], env: dict[str, str], cwd: Path
) -> subprocess.Popen[str]:
    return network.popen(  # type: ignore[return-value]
        host, argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_three_users_on_three_hosts_get_equal_shares(
    network: Network, site: dict[str, object], tmp_path: Path
) -> None:
    script = tmp_path / "timed.py"
    script.write_text(TIMED_CLIENT)
    credentials: dict[str, Path] = site["credentials"]  # type: ignore[assignment]
    procs = [
        run_in(
            network,
            host,
            [
                sys.executable,
                str(script),
                str(site["address"]),
                str(credentials[name]),
                "30",
                "0.3",
            ],
            env_for(),
            tmp_path,
        )
        for host, name in zip(network.hosts[4:7], USERS, strict=True)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, out + err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    for out in outs:
        assert out["results"] == list(range(30))
    start = max(min(s for s, _e in out["times"]) for out in outs)
    end = min(max(e for _s, e in out["times"]) for out in outs)
    assert end - start > 1.0, "the clients barely overlapped"
    shares = [busy_within(out["times"], start, end) for out in outs]
    mean = sum(shares) / len(shares)
    assert all(abs(share - mean) <= 0.1 * mean for share in shares), shares


def test_dispy_shared_sample_runs_unchanged(
    network: Network, site: dict[str, object], tmp_path: Path
) -> None:
    credentials: dict[str, Path] = site["credentials"]  # type: ignore[assignment]
    env = env_for(
        DISPYNB_TEST_SCHEDULER=str(site["address"]).split(":")[0],
        DISPYNB_SECRET_FILE=str(credentials["alice"]),
    )
    proc = run_in(
        network,
        network.hosts[4],
        [sys.executable, str(PROGRAMS / "shared_sample.py")],
        env,
        tmp_path,
    )
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, out + err
    lines = [line for line in out.splitlines() if " executed job " in line]
    assert len(lines) == 10
    assert {line.split()[0] for line in lines} <= {"node-h2", "node-h3", "node-h4"}
    assert "Total job time" in out


def test_killed_node_host_reentrant_jobs_run_elsewhere(
    network: Network, site: dict[str, object], tmp_path: Path
) -> None:
    credentials: dict[str, Path] = site["credentials"]  # type: ignore[assignment]
    nodes: list[NetNode] = site["nodes"]  # type: ignore[assignment]
    script = tmp_path / "reentrant.py"
    script.write_text(REENTRANT_CLIENT)
    started = tmp_path / "started"
    started.mkdir()
    release = tmp_path / "release"
    proc = run_in(
        network,
        network.hosts[5],
        [
            sys.executable,
            str(script),
            str(site["address"]),
            str(credentials["bob"]),
            str(started),
            str(release),
        ],
        env_for(),
        tmp_path,
    )
    # Six jobs held at once on 3 nodes of 2 CPUs: two run on each node, so the
    # killed node surely has jobs running (not a guess from timing).
    deadline = time.monotonic() + 60
    while len(list(started.iterdir())) < 6:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, sorted(started.iterdir())
        time.sleep(0.02)
    nodes[0].kill()
    release.touch()
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, out + err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["results"] == list(range(12))
    # Nothing ran to its end on the killed node (h2): its jobs were held till then.
    assert set(result["hosts"]) <= {"node-h3", "node-h4"}
    log = Path(str(site["log"])).read_text()
    assert "queued again" in log


#: A reentrant client: 12 jobs that each write a file in STARTED when they start,
#: then wait for the file RELEASE to exist.
REENTRANT_CLIENT = """
import json, sys
from dispynb import SharedJobCluster

def held(n, started, release):
    import os, socket, time
    with open(os.path.join(started, f"{n}-{os.getpid()}"), "w"):
        pass
    deadline = time.monotonic() + 60
    while not os.path.exists(release):
        assert time.monotonic() < deadline, "never released"
        time.sleep(0.02)
    return n, socket.gethostname()

address, credential, started, release = sys.argv[1:5]
with SharedJobCluster(
    held, scheduler_host=address, secret_file=credential, reentrant=True
) as cluster:
    jobs = [cluster.submit(i, started, release) for i in range(12)]
    results = [job() for job in jobs]
out = {"results": [r[0] for r in results], "hosts": [r[1] for r in results]}
print(json.dumps(out))
"""


#: Recovers the jobs of DOOMED_CLIENT's journal; prints their results as JSON.
RECOVER = """
import json, sys
from dispynb import recover_jobs

jobs = recover_jobs(sys.argv[1], secret_file=sys.argv[2], timeout=60)
print(json.dumps(sorted([job.result, int(job.status)] for job in jobs)))
"""


def test_client_killed_on_one_host_collects_its_results_from_another(
    network: Network, site: dict[str, object], tmp_path: Path
) -> None:
    """The client's host h5 loses it (kill -9) while its jobs run; the user
    collects every result once from h6 with the journal (a shared file system)."""
    credentials: dict[str, Path] = site["credentials"]  # type: ignore[assignment]
    journal = tmp_path / "carol.journal"
    doomed = tmp_path / "doomed.py"
    doomed.write_text(DOOMED_CLIENT)
    proc = run_in(
        network,
        network.hosts[4],
        [sys.executable, str(doomed), str(site["address"]), str(credentials["carol"]),
         str(journal)],
        env_for(),
        tmp_path,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "first done"
    finally:
        proc.kill()
        proc.communicate()
    log = Path(str(site["log"]))
    deadline = time.monotonic() + 20
    while "client gone; its jobs go on" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    script = tmp_path / "recover.py"
    script.write_text(RECOVER)
    collector = run_in(
        network,
        network.hosts[5],
        [sys.executable, str(script), str(journal), str(credentials["carol"])],
        env_for(),
        tmp_path,
    )
    out, err = collector.communicate(timeout=90)
    assert collector.returncode == 0, out + err
    assert json.loads(out.strip().splitlines()[-1]) == [[n * 10, 11] for n in range(6)]


#: Waits until its cluster lists ``count`` nodes; prints their addresses and a result.
NODES_CLIENT = """
import json, sys, time
from dispynb import SharedJobCluster

address, credential, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with SharedJobCluster(abs, scheduler_host=address, secret_file=credential) as cluster:
    deadline = time.monotonic() + 30
    while len(cluster.status().nodes) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    nodes = sorted(f"{n.ip_addr}:{n.port}" for n in cluster.status().nodes)
    result = cluster.submit(-7)()
print(json.dumps({"nodes": nodes, "result": result}))
"""


def test_scheduler_discovers_nodes_without_being_told(
    network: Network, tmp_path: Path
) -> None:
    """No -n (dispyscheduler's default '*'): the scheduler on h1 finds the node
    already running on h2 by broadcast, and the one started on h3 after it by that
    node's announcement; a client on h5 sees both."""
    secret, _file = new_secret_file(tmp_path)
    credential = add_user(tmp_path, "dave")
    nodes = [start_node(network, network.hosts[1], tmp_path, secret, "--cpus", "1")]
    sched_host = network.hosts[0]
    log = tmp_path / "scheduler.log"
    argv = [
        sys.executable, "-m", "schedserver",
        "-i", sched_host.ip, "-p", str(SCHEDULER_PORT),
        "--users", str(tmp_path / "users"),
    ]  # fmt: skip
    with open(log, "wb") as handle:
        scheduler = network.popen(
            sched_host,
            argv,
            env=env_for(DISPYNB_SECRET=secret),
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:

        def wait_up(count: int) -> None:
            deadline = time.monotonic() + 30
            while log.read_text().count("is up with") < count:
                assert scheduler.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)

        wait_up(1)
        nodes.append(
            start_node(network, network.hosts[2], tmp_path, secret, "--cpus", "1")
        )
        wait_up(2)
        script = tmp_path / "nodes.py"
        script.write_text(NODES_CLIENT)
        address = f"{sched_host.ip}:{SCHEDULER_PORT}"
        proc = run_in(
            network,
            network.hosts[4],
            [sys.executable, str(script), address, str(credential), "2"],
            env_for(),
            tmp_path,
        )
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, out + err
        seen = json.loads(out.strip().splitlines()[-1])
        assert seen == {"nodes": sorted(node.spec for node in nodes), "result": 7}
    finally:
        scheduler.terminate()
        try:
            scheduler.wait(20)
        except subprocess.TimeoutExpired:
            scheduler.kill()
            scheduler.wait()
        for node in nodes:
            node.stop()
