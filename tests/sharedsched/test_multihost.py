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
    hosts_or_skip,
    new_secret_file,
    start_node,
)
from tests.sharedsched.harness import (
    DOOMED_CLIENT,
    TIMED_CLIENT,
    add_user,
    busy_within,
    env_for,
    shared_window,
)

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(120)]

PROGRAMS = Path(__file__).parent / "programs"
USERS = ("alice", "bob", "carol")
SCHEDULER_PORT = 9712


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    with hosts_or_skip(7) as net:
        yield net


@pytest.fixture
def site(network: Network, tmp_path: Path) -> Iterator[dict[str, object]]:
    """Nodes on h2-h4, the scheduler on h1, credentials for three users;
    ``start_scheduler()`` starts it (again, after a kill: the same command)."""
    secret, _file = new_secret_file(tmp_path)
    nodes: list[NetNode] = []
    schedulers: list[subprocess.Popen[bytes]] = []
    log = tmp_path / "scheduler.log"
    sched_host = network.hosts[0]

    def start_scheduler() -> subprocess.Popen[bytes]:
        argv = [
            sys.executable, "-m", "schedserver",
            "-i", sched_host.ip, "-p", str(SCHEDULER_PORT),
            "--users", str(tmp_path / "users"),
            "--port_file", str(tmp_path / "scheduler.port"),
        ]  # fmt: skip
        for node in nodes:
            argv += ["-n", node.spec]
        since = len(log.read_text()) if log.exists() else 0
        with open(log, "ab") as handle:
            scheduler = network.popen(
                sched_host,
                argv,
                env=env_for(DISPYNB_SECRET=secret),
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        schedulers.append(scheduler)
        deadline = time.monotonic() + 20
        while log.read_text()[since:].count("is up with") < len(nodes):
            assert scheduler.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        return scheduler

    try:
        for host in network.hosts[1:4]:
            nodes.append(start_node(network, host, tmp_path, secret, "--cpus", "2"))
        credentials = {name: add_user(tmp_path, name) for name in USERS}
        start_scheduler()
        yield {
            "address": f"{sched_host.ip}:{SCHEDULER_PORT}",
            "credentials": credentials,
            "nodes": nodes,
            "log": log,
            "schedulers": schedulers,
            "start_scheduler": start_scheduler,
        }
    finally:
        for scheduler in schedulers:
            if scheduler.poll() is None:
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


def start_held_client(
    network: Network,
    host: Host,
    tmp_path: Path,
    program: str,
    address: object,
    credential: Path,
) -> tuple[subprocess.Popen[str], Path, Path]:
    """Run ``program`` on ``host`` as ``PROGRAM ADDRESS CREDENTIAL STARTED RELEASE``
    (its jobs mark ``started`` and wait for ``release``); the process and the two
    paths."""
    script = tmp_path / "client.py"
    script.write_text(program)
    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()
    proc = run_in(
        network,
        host,
        [sys.executable, str(script), str(address), str(credential), str(started),
         str(release)],
        env_for(),
        tmp_path,
    )  # fmt: skip
    return proc, started, release


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
    start, end = shared_window(outs)
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
    proc, started, release = start_held_client(
        network, network.hosts[5], tmp_path, REENTRANT_CLIENT,
        site["address"], credentials["bob"],
    )  # fmt: skip
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


def nodes_seen_by_a_client(
    network: Network, tmp_path: Path, sched_host: Host, credential: Path, count: int
) -> dict[str, object]:
    """Run `NODES_CLIENT` on the fifth host against the scheduler on ``sched_host``;
    what it printed: the nodes its cluster listed and its job's result."""
    script = tmp_path / "nodes.py"
    script.write_text(NODES_CLIENT)
    address = f"{sched_host.ip}:{SCHEDULER_PORT}"
    proc = run_in(
        network,
        network.hosts[4],
        [sys.executable, str(script), address, str(credential), str(count)],
        env_for(),
        tmp_path,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    seen: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return seen


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
        seen = nodes_seen_by_a_client(network, tmp_path, sched_host, credential, 2)
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


def test_one_machine_without_a_secret_the_scheduler_finds_its_node(
    network: Network, tmp_path: Path
) -> None:
    """dispy's first steps with a shared scheduler, on one machine: ``dispynb-node``
    with no option and no secret (it serves 127.0.0.1 only), ``dispynb-scheduler``
    with only its users file, and dispy's sample with ``SharedJobCluster(compute,
    scheduler_host='127.0.0.1')``. The scheduler pings 127.0.0.1 as well as the
    networks, as a client without a secret does, and finds the node."""
    host = network.hosts[0]
    node = start_node(network, host, tmp_path, None, "--cpus", "2")  # no secret
    credential = add_user(tmp_path, "erin")
    log = tmp_path / "scheduler.log"
    argv = [sys.executable, "-m", "schedserver", "--users", str(tmp_path / "users")]
    with open(log, "wb") as handle:
        scheduler = network.popen(
            host, argv, env=env_for(), stdout=handle, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 20
        while "dispynb-scheduler serving" not in log.read_text():
            assert scheduler.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        proc = run_in(
            network,
            host,
            [sys.executable, str(PROGRAMS / "shared_sample.py")],
            env_for(
                DISPYNB_TEST_SCHEDULER="127.0.0.1",
                DISPYNB_SECRET_FILE=str(credential),
            ),
            tmp_path,
        )
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the sample did not end:\n{out}{err}\n{log.read_text()}")
        assert proc.returncode == 0, out + err
        lines = [line for line in out.splitlines() if " executed job " in line]
        assert len(lines) == 10
        assert {line.split()[0] for line in lines} == {node.name}
        assert "no node found" not in log.read_text()
    finally:
        scheduler.terminate()
        try:
            scheduler.wait(20)
        except subprocess.TimeoutExpired:
            scheduler.kill()
            scheduler.wait()
        node.stop()


#: Bob's client: one job that says it runs (a file in STARTED) and waits for
#: RELEASE; prints its computation and job numbers, then its result and status.
VICTIM_CLIENT = """
import json, sys
from dispynb import SharedJobCluster

def held(started, release):
    import os, time
    open(os.path.join(started, "victim"), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(release):
        assert time.monotonic() < deadline, "never released"
        time.sleep(0.02)
    return 42

address, credential, started, release = sys.argv[1:5]
with SharedJobCluster(held, scheduler_host=address, secret_file=credential) as cluster:
    job = cluster.submit(started, release)
    comp_id = cluster._backend.driver.config.comp_id
    print(json.dumps({"comp_id": comp_id, "key": job._key}), flush=True)
    result = job()
print(json.dumps({"result": result, "status": int(job.status)}))
"""

#: Alice's attack from her own host: her credential, Bob's job named.
ATTACKER = """
import asyncio, json, sys
from dispynb.protocol.messages import Error, JobCancel, JobResults
from dispynb.secret import read_secret_file
from dispynb.transport.connector import connect

async def attack(host, port, credential, comp_id, key):
    conn, _ = await connect(host, port, secret=read_secret_file(credential),
                            max_message_size=1 << 20)
    try:
        conn.write(JobCancel(comp_id=comp_id, key=key, attempt=1))
        async with asyncio.timeout(20):
            while True:
                reply, _ = await conn.recv()
                if isinstance(reply, JobResults):
                    return "results: " + repr(reply)
                if isinstance(reply, Error):
                    return reply.message
    finally:
        conn.close()

host, port = sys.argv[1].rsplit(":", 1)
message = asyncio.run(
    attack(host, int(port), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
)
print(json.dumps(message))
"""


def test_a_user_on_one_host_cannot_cancel_another_users_job_on_another(
    network: Network, site: dict[str, object], tmp_path: Path
) -> None:
    """Bob's job runs (his client on h6); Alice, on h7 with her own credential,
    sends the scheduler a cancel naming Bob's computation and job: refused, and
    Bob's job ends Finished with its result."""
    credentials: dict[str, Path] = site["credentials"]  # type: ignore[assignment]
    (tmp_path / "attacker.py").write_text(ATTACKER)
    victim, started, release = start_held_client(
        network, network.hosts[5], tmp_path, VICTIM_CLIENT,
        site["address"], credentials["bob"],
    )  # fmt: skip
    try:
        assert victim.stdout is not None
        ids = json.loads(victim.stdout.readline())
        deadline = time.monotonic() + 30
        while not (started / "victim").exists():
            assert victim.poll() is None, victim.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        attacker = run_in(
            network,
            network.hosts[6],
            [sys.executable, str(tmp_path / "attacker.py"), str(site["address"]),
             str(credentials["alice"]), str(ids["comp_id"]), str(ids["key"])],
            env_for(),
            tmp_path,
        )  # fmt: skip
        out, err = attacker.communicate(timeout=60)
        assert attacker.returncode == 0, out + err
        refusal = json.loads(out.strip().splitlines()[-1])
        assert "alice" in refusal and "own computations" in refusal, refusal
        release.touch()
        out, err = victim.communicate(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.communicate()
    assert victim.returncode == 0, out + err
    assert json.loads(out.strip().splitlines()[-1]) == {"result": 42, "status": 11}


#: Six reentrant jobs that say they run and wait for RELEASE; prints their results
#: and statuses once all are done.
RESTARTED_CLIENT = """
import json, sys
from dispynb import SharedJobCluster

def held(n, started, release):
    import os, time
    open(os.path.join(started, f"{n}-{os.getpid()}"), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(release):
        assert time.monotonic() < deadline, "never released"
        time.sleep(0.02)
    return n

address, credential, started, release = sys.argv[1:5]
with SharedJobCluster(
    held, scheduler_host=address, secret_file=credential, reentrant=True
) as cluster:
    jobs = [cluster.submit(i, started, release) for i in range(6)]
    results = [job() for job in jobs]
print(json.dumps({"results": results, "statuses": [int(j.status) for j in jobs]}))
"""


def test_scheduler_killed_and_restarted_on_its_host_reentrant_jobs_run_again(
    network: Network, site: dict[str, object], tmp_path: Path
) -> None:
    """Six reentrant jobs of a client on h5 run on the three nodes; the scheduler
    on h1 is killed (SIGKILL) and started again. What survives: the client (it
    reconnects) and its jobs, which run again on the nodes (the scheduler keeps
    nothing on disk; the nodes ended what ran for it): each result arrives once."""
    credentials: dict[str, Path] = site["credentials"]  # type: ignore[assignment]
    schedulers: list[subprocess.Popen[bytes]] = site["schedulers"]  # type: ignore[assignment]
    proc, started, release = start_held_client(
        network, network.hosts[4], tmp_path, RESTARTED_CLIENT,
        site["address"], credentials["carol"],
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while len(list(started.iterdir())) < 6:  # one per CPU: all six run
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, sorted(started.iterdir())
        time.sleep(0.02)
    first_runs = set(started.iterdir())
    schedulers[-1].kill()
    schedulers[-1].wait()
    site["start_scheduler"]()  # type: ignore[operator]
    # Each job runs again: a second file per job number, from a new process.
    while len({p.name.split("-")[0] for p in set(started.iterdir()) - first_runs}) < 6:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline + 60, sorted(started.iterdir())
        time.sleep(0.02)
    release.touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert json.loads(out.strip().splitlines()[-1]) == {
        "results": list(range(6)),
        "statuses": [11] * 6,
    }


def test_nodes_on_other_hosts_register_with_dispynodes_scheduler_host(
    network: Network, tmp_path: Path
) -> None:
    """The scheduler on h1 with ``--register_port`` (its default port 9714) and no
    -n; a node on h2 started as for dispy (``--scheduler_host H1``) registers and
    runs the job of a client on h5; a node on h3 with another secret is refused
    (the scheduler logs it, never connects to it)."""
    secret, _file = new_secret_file(tmp_path)
    (tmp_path / "other").mkdir()
    other, _other_file = new_secret_file(tmp_path / "other")
    credential = add_user(tmp_path, "erin")
    sched_host = network.hosts[0]
    log = tmp_path / "scheduler.log"
    argv = [
        sys.executable, "-m", "schedserver",
        "-i", sched_host.ip, "-p", str(SCHEDULER_PORT), "--register_port",
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
    nodes: list[NetNode] = []
    try:
        deadline = time.monotonic() + 30
        while f"registrations on {sched_host.ip}:9714" not in log.read_text():
            assert scheduler.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        wrong = start_node(
            network, network.hosts[2], tmp_path, other, "--cpus", "1",
            "--scheduler_host", sched_host.ip, wait=False,
        )  # fmt: skip
        nodes.append(wrong)
        wrong.proc.wait(30)
        assert "rejected this node's registration" in wrong.log_text()
        good = start_node(
            network, network.hosts[1], tmp_path, secret, "--cpus", "2",
            "--scheduler_host", sched_host.ip,
        )  # fmt: skip
        nodes.append(good)
        while f"node {good.spec} is up with 2 CPUs" not in log.read_text():
            assert scheduler.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        seen = nodes_seen_by_a_client(network, tmp_path, sched_host, credential, 1)
        assert seen == {"nodes": [good.spec], "result": 7}
        text = log.read_text()
        assert text.count(f"registration from {network.hosts[2].ip} refused") == 1
        assert network.hosts[2].ip not in text.replace(
            f"registration from {network.hosts[2].ip} refused", ""
        )
    finally:
        scheduler.terminate()
        try:
            scheduler.wait(20)
        except subprocess.TimeoutExpired:
            scheduler.kill()
            scheduler.wait()
        for node in nodes:
            node.stop()
