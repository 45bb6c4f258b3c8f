"""Node faults with reentrant jobs: kill -9, SIGSTOP/SIGCONT, a cut and healed link.

Every job must end Finished exactly once with the right result, whatever happened to
the node it first ran on; re-executions are counted from the jobs' marker files.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.multihost.conftest import Site
from tests.multihost.netns import Host, NetNode, Network, start_client, wait_for
from tests.multihost.programs import (
    CLIENT,
    FINISHED,
    Run,
    job_args,
    read_runs,
    started_on,
)

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

JOBS = 9
SECONDS = 1.5
#: The client's pulse interval: a silent node is dead after 3 of them.
PULSE = 0.2


def run_with_fault(
    network: Network,
    nodes: list[NetNode],
    client_host: Host,
    secret: str,
    tmp_path: Path,
    fault: str,
) -> float | None:
    """Run `JOBS` reentrant jobs; apply ``fault`` to nodes[1] once it runs one.

    Checks the outcome; returns the seconds from the fault until the client logged
    the victim's loss (None if it logged nothing about it).
    """
    victim = nodes[1]
    markers = tmp_path / "markers"
    args = job_args([n.spec for n in nodes], secret, markers, JOBS, SECONDS)
    args["options"] = {"reentrant": True, "pulse_interval": PULSE}
    client = start_client(network, client_host, tmp_path, CLIENT, args)
    try:
        wait_for(
            lambda: any(victim.host.ip in ips for ips in started_on(markers).values()),
            30,
            "a job running on the victim node",
        )
        victims = {n for n, ips in started_on(markers).items() if victim.host.ip in ips}
        fault_time = time.time()
        if fault == "kill":
            victim.kill()
        elif fault == "stop":
            victim.pause()
        else:
            network.cut(victim.host)

        def rerun() -> bool:
            runs = started_on(markers)
            return any(len(runs[n]) > 1 for n in victims)

        wait_for(rerun, 30, "a job of the victim running again elsewhere")
        if fault == "stop":
            victim.resume()  # its late result must be discarded
        elif fault == "cut":
            network.heal(victim.host)
        jobs = client.result(60)
    finally:
        client.stop()
    noticed = [t for t in client.log_times(victim.spec) if t >= fault_time]
    detection = min(noticed) - fault_time if noticed else None
    check_exactly_once(jobs, read_runs(markers), victim, fault_time)
    return detection


def check_exactly_once(
    jobs: list[dict[str, object]],
    runs: dict[str, Run],
    victim: NetNode,
    fault_time: float,
) -> None:
    """One correct final result per job, and never a stale one.

    A result is stale if it comes from a run on the victim that started before the
    fault while the job was run again elsewhere after the fault (the re-run is the
    job's current attempt then; the victim's was fenced).
    """
    assert [j["status"] for j in jobs] == [FINISHED] * JOBS, jobs
    assert [j["result"] for j in jobs] == [n * n for n in range(JOBS)]
    assert {r.n for r in runs.values()} == set(range(JOBS))
    for job in jobs:
        accepted = runs[str(job["run"])]
        assert (accepted.n, accepted.ip) == (job["id"], job["ip"]), job
        rerun = any(
            r.n == accepted.n and r.ip != victim.host.ip and r.started > fault_time
            for r in runs.values()
        )
        stale = accepted.ip == victim.host.ip and accepted.started < fault_time
        assert not (rerun and stale), f"stale result accepted: {job}"
    print(
        f"jobs {JOBS}, finished {len(jobs)}, runs {len(runs)}, re-run "
        f"{len(runs) - JOBS}, lost 0, duplicated results 0"
    )


@pytest.mark.parametrize("fault", ["kill", "stop", "cut"])
def test_reentrant_jobs_survive_a_node_fault(site: Site, fault: str) -> None:
    nodes = [site.start(host) for host in site.node_hosts]
    detection = run_with_fault(
        site.network, nodes, site.client_host, site.secret, site.directory, fault
    )
    # (bounded by the 30 s wait for a re-run: TCP alone would take minutes for stop
    # and cut; the pulses tell within about 3 x PULSE)
    print(f"{fault}: the client logged the node's loss after {detection} s")
