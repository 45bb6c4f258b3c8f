"""The JupyterLab panel's kernel side (dispynb.jupyter.labcomm), with a fake comm:
the state it pushes of real clusters on local nodes (counts, nodes, lost nodes,
closed cards) and their cancel (the link's requests: `test_labcomm_link.py`;
discovery: `test_labcomm_discover.py`).
"""

from __future__ import annotations

import functools
import itertools
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from dispynb import JobCluster, LocalCluster
from dispynb.job import JobStatus
from dispynb.jupyter import labclusters, labcomm
from dispynb.jupyter.labcomm import ClusterTracker
from tests import jobs
from tests.jupyter.fakecomm import INTERVAL, state_of
from tests.jupyter.helpers import hold_setup, wait_then_return
from tests.jupyter.shell import magic_shell

ROOT = Path(__file__).resolve().parents[2]


def test_state_shows_progress_nodes_and_throttles(
    local: LocalCluster, tmp_path: Path, link_of: Any
) -> None:
    gate = tmp_path / "gate"
    with JobCluster(wait_then_return, nodes=local) as cluster:
        _, comm, _ = link_of(lambda: [cluster])
        jobs = [cluster.submit(str(gate), i) for i in range(6)]
        first = comm.wait_for(
            state_of(cluster, lambda c: c["counts"]["running"] >= 2 and c["nodes"])
        )
        assert first["protocol"] == labcomm.PROTOCOL
        snap = next(c for c in first["clusters"] if c["id"] == cluster.uid)
        assert "jobs" not in snap  # the panel needs counts and nodes only
        counts = snap["counts"]
        assert counts["total"] == 6 == counts["pending"] + counts["running"]
        (node,) = snap["nodes"]
        assert node["cpus"] == 2 and node["busy"] >= 2  # jobs in flight count too
        assert node["id"] == f"{local.addresses[0][0]}:{local.addresses[0][1]}"
        gate.touch()
        comm.wait_for(state_of(cluster, lambda c: c["counts"]["finished"] == 6))
        assert [job() for job in jobs] == list(range(6))
    times = [t for t, _ in comm.states()]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= INTERVAL * 0.8, gaps  # throttled: one push per poll at most


def _panel_fields(interface: str) -> set[str]:
    """The fields of ``interface`` in labextension/src/protocol.ts: what the panel
    reads of the kernel's state."""
    source = (ROOT / "labextension/src/protocol.ts").read_text()
    found = re.search(rf"export interface {interface} {{(.*?)\n}}", source, re.S)
    assert found, f"no interface {interface} in protocol.ts"
    body = re.sub(r"/\*.*?\*/", "", found.group(1), flags=re.S)
    return set(re.findall(r"^\s*(\w+)\??:", body, re.M))


def _one_job_then_closed(
    local: LocalCluster, link_of: Any
) -> tuple[JobCluster, dict[str, Any], dict[str, Any]]:
    """A cluster the panel follows runs one job and closes: the state once the panel
    saw the job finished on a node that reported its load, and once it is closed."""
    live: list[JobCluster] = []
    _, comm, _ = link_of(lambda: list(live))
    cluster = JobCluster(abs, nodes=local)
    live.append(cluster)
    try:
        cluster.submit(-3)
        cluster.wait()
        # the panel saw it alive (the final counts come from its monitor)
        alive = comm.wait_for(
            state_of(
                cluster,
                lambda c: c["counts"]["finished"] == 1 and c["nodes"][0]["avail"],
            )
        )
    finally:
        cluster.close()
        live.clear()
    return cluster, alive, comm.wait_for(state_of(cluster, lambda c: c["closed"]))


def test_a_run_whose_nodes_run_its_setup_is_shown_starting_under_its_name(
    local: LocalCluster, tmp_path: Path, link_of: Any
) -> None:
    """While the nodes run a run's setup (a model loading), its card bears the
    run's name (``--into``) and says it is starting; it bore the function's name
    and "no nodes connected yet" until the setup ended."""
    from dispynb.jupyter.run import Run
    from dispynb.monitoring import live_clusters

    marker, release = tmp_path / "setup-began", tmp_path / "release"
    _, comm, _ = link_of(live_clusters)
    runs: list[Run] = []

    def run_it() -> None:
        setup = functools.partial(hold_setup, str(marker), str(release))
        runs.append(
            Run.map(jobs.square, range(3), nodes=local, setup=setup, name="preds")
        )

    thread = threading.Thread(target=run_it, daemon=True)
    thread.start()
    try:
        jobs.wait_for_path(marker)
        state = comm.wait_for(
            lambda d: (
                d["type"] == "state" and any(c.get("starting") for c in d["clusters"])
            ),
            timeout=10,
        )
    finally:
        release.touch()
        thread.join(jobs.WAIT)
    (card,) = [c for c in state["clusters"] if c["starting"]]
    assert card["name"] == "preds" and card["nodes"] == [], card
    assert card["counts"]["total"] == 0
    (run,) = runs
    # Started, ran and closed: no longer said to be starting.
    comm.wait_for(
        state_of(
            run.cluster,
            lambda c: c["name"] == "preds" and not c["starting"] and c["closed"],
        )
    )
    assert run.results == [0, 1, 4]


def test_the_state_carries_what_the_panel_reads_and_nothing_more(
    local: LocalCluster, link_of: Any
) -> None:
    """A page closed without closing its comm has each push kept by the server:
    the state holds the fields of protocol.ts's interfaces, no others (before: a
    node's address twice, its traffic, CPU time and platform; a cluster's clock)."""
    cluster, state, final = _one_job_then_closed(local, link_of)
    assert set(state) == _panel_fields("IStateMsg")
    assert set(state["session"]) == _panel_fields("ISession")
    for shown in (state, final):
        (snap,) = [c for c in shown["clusters"] if c["id"] == cluster.uid]
        assert set(snap) == _panel_fields("ICluster")
        assert set(snap["counts"]) == _panel_fields("ICounts")
        (node,) = snap["nodes"]
        # (No node was lost: `lost` is only on those that were.)
        fields = _panel_fields("INode") - {"lost"}
        fields -= {"released"} if shown is state else set()
        assert set(node) == fields
        assert set(node["avail"]) == _panel_fields("INodeAvail")


def test_closed_cluster_keeps_its_final_counts(
    local: LocalCluster, link_of: Any
) -> None:
    cluster, _, final = _one_job_then_closed(local, link_of)
    snap = next(c for c in final["clusters"] if c["id"] == cluster.uid)
    assert snap["counts"]["finished"] == 1 and snap["counts"]["total"] == 1
    # Where it ran, not "no nodes connected yet": its nodes, released.
    (node,) = snap["nodes"]
    assert node["released"] and node["jobs_done"] == 1 and node["busy"] == 0


def test_a_cluster_that_lived_between_two_refreshes_is_shown_closed(
    local: LocalCluster,
) -> None:
    """A run of a few quick jobs may open and close between two polls of the live
    clusters (the panel's refreshes): it must still be shown, closed, with where
    it ran; once, however the refreshes and the close interleave."""
    from dispynb.monitoring import live_clusters

    tracker = ClusterTracker(live_clusters)
    try:
        before = tracker.refresh()
        with JobCluster(abs, nodes=local) as quick:
            jobs = [quick.submit(-i) for i in range(4)]
            quick.wait()
        assert [job() for job in jobs] == [0, 1, 2, 3]
        assert tracker.refresh() != before  # the state changed: the links push
        mine = [c for c in tracker.snapshots() if c["id"] == quick.uid]
        assert len(mine) == 1, mine
        (snap,) = mine
        assert snap["closed"] and snap["name"] == "abs"
        assert snap["counts"]["finished"] == 4 == snap["counts"]["total"]
        (node,) = snap["nodes"]
        assert node["released"] and node["jobs_done"] == 4 and node["busy"] == 0
        # Followed while alive, then closed: still one card.
        with JobCluster(abs, nodes=local) as followed:
            tracker.refresh()
            followed.submit(-1)
            followed.wait()
        tracker.refresh()
        ids = [c["id"] for c in tracker.snapshots()]
        assert ids.count(followed.uid) == 1 and ids.count(quick.uid) == 1, ids
    finally:
        tracker.close()
    # A closed tracker no longer keeps what closes.
    with JobCluster(abs, nodes=local) as later:
        later.submit(-1)
        later.wait()
    assert later.uid not in {c["id"] for c in tracker.snapshots()}


def test_probes_and_clusters_that_ran_nothing_are_never_shown(
    local: LocalCluster, link_of: Any
) -> None:
    from dispynb.jupyter.magics import Session
    from dispynb.monitoring import live_clusters

    _, comm, _ = link_of(live_clusters)
    session = Session()
    session.nodes, session.options = local.node_specs(), {"secret": local.secret}
    empty = JobCluster(abs, nodes=local)
    comm.wait_for(state_of(empty, lambda c: not c["closed"]))
    for _ in range(5):  # what %dispy local / %dispy nodes do: connect, close
        session.probe()
    empty.close()
    with JobCluster(abs, nodes=local) as ran:
        ran.submit(-1)
        ran.wait()
        comm.wait_for(state_of(ran, lambda c: c["counts"]["finished"] == 1))
    comm.wait_for(state_of(ran, lambda c: c["closed"]))
    names = {c["name"] for _, state in comm.states() for c in state["clusters"]}
    assert "_dispynb_node_probe" not in names
    last = comm.states()[-1][1]["clusters"]
    assert empty.uid not in {c["id"] for c in last}  # closed with no job: dropped


def test_cancel_ends_every_unfinished_job(
    local: LocalCluster, tmp_path: Path, link_of: Any
) -> None:
    """The panel's Cancel on a plain JobCluster ends its jobs, and counts them all
    cancelled: those it ended while they ran (Terminated) read 'failed' before."""
    gate = tmp_path / "never"
    with JobCluster(wait_then_return, nodes=local) as cluster:
        link, comm, _ = link_of(lambda: [cluster])
        jobs = [cluster.submit(str(gate), i) for i in range(5)]
        comm.wait_for(state_of(cluster, lambda c: c["counts"]["running"] >= 2))
        link.on_message(
            {"type": "request", "id": 7, "action": "cancel", "cluster": cluster.uid}
        )
        reply = comm.reply(7)
        assert reply == {"type": "reply", "id": 7, "ok": True, "result": 5}
        for job in jobs:
            job()
        ended = comm.wait_for(
            state_of(
                cluster,
                lambda c: c["counts"]["cancelled"] + c["counts"]["terminated"] == 5,
            )
        )
        snap = next(c for c in ended["clusters"] if c["id"] == cluster.uid)
        assert snap["counts"]["running"] == snap["counts"]["pending"] == 0
        assert snap["counts"]["cancelled"] == 5, snap["counts"]
        assert {job.status for job in jobs} >= {JobStatus.Terminated}


def test_cancel_of_a_runs_cluster_counts_its_jobs_cancelled_not_failed(
    local: LocalCluster, tmp_path: Path, link_of: Any
) -> None:
    """The panel's Cancel on the cluster of a run (a %%dispy cell's): its running
    jobs end Terminated, and the run counts them as cancelled, as after Stop (it
    counted them as failures, and printed them as failed jobs); so does the panel."""
    from dispynb.jupyter.run import Run

    gate = tmp_path / "never"
    run = Run(name="gated")
    with JobCluster(wait_then_return, nodes=local, **run.callbacks()) as cluster:
        run.attach(cluster)
        link, comm, _ = link_of(lambda: [cluster])
        for i in range(5):
            run.submit(str(gate), i)
        comm.wait_for(state_of(cluster, lambda c: c["counts"]["running"] >= 2))
        link.on_message(
            {"type": "request", "id": 7, "action": "cancel", "cluster": cluster.uid}
        )
        assert comm.reply(7)["ok"]
        assert run.wait(timeout=30, echo=False)
        # The panel counts them as the cell does: cancelled, none failed (it said
        # 'terminated' of the running ones the Cancel ended).
        comm.wait_for(
            state_of(
                cluster,
                lambda c: (
                    c["counts"]["cancelled"] == 5 and c["counts"]["terminated"] == 0
                ),
            )
        )

    counts = run.counts()
    assert counts.failed == 0 and counts.cancelled == 5, counts
    assert run.failures == []
    assert {job.status for job in run.jobs} >= {JobStatus.Terminated}


def test_a_node_lost_while_its_cluster_runs_stays_shown_as_lost(
    link_of: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node killed under a run: the card keeps it for `GONE_SHOWN` seconds,
    marked lost (as ``%dispy panel`` and dispy's monitor show a dead node), with
    the jobs it ended, then drops it. Before, it vanished from the card at once,
    and a run whose only node died read 'no nodes connected yet'."""
    import os
    import signal

    monkeypatch.setattr(labclusters, "GONE_SHOWN", 3.0)
    with (
        LocalCluster(nodes=2, cpus=1) as nodes,
        JobCluster(pow, nodes=nodes) as cluster,
    ):
        _, comm, _ = link_of(lambda: [cluster])
        assert [job() for job in [cluster.submit(2, i) for i in range(4)]]
        comm.wait_for(state_of(cluster, lambda c: len(c["nodes"]) == 2))
        os.kill(nodes.pids[1], signal.SIGKILL)
        state = comm.wait_for(
            state_of(cluster, lambda c: any(n.get("released") for n in c["nodes"]))
        )
        snap = next(c for c in state["clusters"] if c["id"] == cluster.uid)
        by_name = {node["name"]: node for node in snap["nodes"]}
        assert set(by_name) == set(nodes.names), snap["nodes"]
        gone = by_name[nodes.names[1]]
        # Said as lost, for the panel to say in words (before: only a name
        # suffix, beside 'released').
        assert gone["lost"] and gone["released"] and gone["busy"] == 0, gone
        assert not by_name[nodes.names[0]].get("released"), snap["nodes"]
        assert not by_name[nodes.names[0]].get("lost"), snap["nodes"]
        # ... for GONE_SHOWN seconds, then it is dropped.
        comm.wait_for(
            state_of(
                cluster, lambda c: [n["name"] for n in c["nodes"]] == [nodes.names[0]]
            ),
            timeout=15,
        )


def test_a_closed_card_keeps_the_node_its_cluster_lost(link_of: Any) -> None:
    """Where a closed run ran includes a node that died under it, marked lost;
    before, the closed card listed only the nodes the cluster still had."""
    import os
    import signal

    with LocalCluster(nodes=2, cpus=1) as nodes:
        cluster = JobCluster(pow, nodes=nodes)
        try:
            _, comm, _ = link_of(lambda: [] if cluster._closed else [cluster])
            assert [job() for job in [cluster.submit(2, i) for i in range(4)]]
            comm.wait_for(state_of(cluster, lambda c: len(c["nodes"]) == 2))
            os.kill(nodes.pids[1], signal.SIGKILL)
            comm.wait_for(
                state_of(cluster, lambda c: any(n.get("released") for n in c["nodes"]))
            )
        finally:
            cluster.close()
        final = comm.wait_for(state_of(cluster, lambda c: c["closed"]))
    snap = next(c for c in final["clusters"] if c["id"] == cluster.uid)
    lost = sorted((node["name"], node.get("lost", False)) for node in snap["nodes"])
    assert lost == [(nodes.names[0], False), (nodes.names[1], True)], snap["nodes"]
    assert all(node["released"] for node in snap["nodes"]), snap["nodes"]


def test_the_nodes_a_closing_cluster_releases_are_not_lost(local: LocalCluster) -> None:
    """A cluster seen by a refresh while it closes (its nodes released, not yet
    gone from the live list): its nodes were marked '(lost)' on its card."""
    cluster = JobCluster(pow, nodes=local)
    tracker = ClusterTracker(lambda: [cluster])
    try:
        assert cluster.submit(2, 3)() == 8
        tracker.refresh()
        (snap,) = tracker.snapshots()
        assert [node["name"] for node in snap["nodes"]] == ["local-0"]
        cluster.close()
        tracker.refresh()  # still listed: the close not seen yet
        (snap,) = tracker.snapshots()
        assert not any(node.get("lost") for node in snap["nodes"]), snap
    finally:
        cluster.close()
        tracker.close()


def test_the_panel_says_which_local_node_of_dispy_local_exited() -> None:
    """One of two ``%dispy local`` nodes killed: the panel's header still said
    '%dispy uses local nodes A, B' while the next cell refused to run ('1 of the
    2 local nodes has exited'). It now marks the node that exited."""
    import os
    import signal

    with magic_shell("--nodes 2 --cpus 1") as shell:
        local = shell.magics_manager.registry["DispyMagics"].session.local
        first, second = (f"{host}:{port}" for host, port in local.addresses)
        assert labcomm._magics_session() == {"kind": "local", "nodes": [first, second]}
        os.kill(local.pids[1], signal.SIGKILL)
        jobs.wait_until(lambda: local.exited() != [])
        assert labcomm._magics_session() == {
            "kind": "local",
            "nodes": [first, f"{second} (exited)"],
        }


def test_the_panel_header_keeps_a_launched_node_that_exited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One of two launched nodes (%dispy ssh, %dispy slurm) died: the panel's
    header dropped it (a launcher lists only the nodes still running), as if it
    had never been started, and called them 'local nodes'. It now lists it
    '(exited)', after the others, and names them as their cell and ``%dispy
    status`` do, after their launcher ('ssh nodes ...'; 'nodes ...' before)."""
    import os
    import signal
    import types

    import IPython

    from dispynb.jupyter.session import Session
    from tests.deploy.test_launcher import LocalProcesses

    session = Session()
    launcher = LocalProcesses()
    session.local = session.nodes = launcher
    magics = types.SimpleNamespace(session=session)
    shell = types.SimpleNamespace(
        magics_manager=types.SimpleNamespace(registry={"DispyMagics": magics})
    )
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    try:
        launcher.start(2)
        launcher.wait_for(2, timeout=30)
        dead, alive = (x.node for x in launcher._launched)
        assert dead is not None and alive is not None
        first, second = (f"{n.host}:{n.port}" for n in (dead, alive))
        assert launcher.kind == "localprocesses"  # as 'ssh' for SSHNodes
        assert labcomm._magics_session() == {
            "kind": launcher.kind,
            "nodes": [first, second],
        }
        handle = launcher._launched[0].handle
        assert handle is not None
        os.kill(handle.pid, signal.SIGKILL)
        jobs.wait_until(lambda: launcher.exited() != [])
        assert labcomm._magics_session() == {
            "kind": launcher.kind,
            "nodes": [second, f"{first} (exited)"],
        }
    finally:
        session.close()


def test_two_runs_of_one_function_are_told_apart(local: LocalCluster) -> None:
    """``Run.map(f, ...)`` twice without ``name=`` showed two cards named "f";
    shown together, the earlier reads "f (1)", the newest "f"."""
    from dispynb.jupyter.run import Run
    from dispynb.monitoring import live_clusters

    tracker = ClusterTracker(live_clusters)
    try:
        first = Run.map(jobs.square, range(2), nodes=local, progress="none")
        second = Run.map(jobs.square, range(3), nodes=local, progress="none")
        for _ in range(2):
            names = {c["id"]: c["name"] for c in tracker.snapshots()}
            assert names[first.cluster.uid] == "square (1)", names
            assert names[second.cluster.uid] == "square", names
        assert (first.results, second.results) == ([0, 1], [0, 1, 4])
    finally:
        tracker.close()


def test_a_run_named_by_the_notebook_keeps_its_name_when_run_again(
    local: LocalCluster,
) -> None:
    """A cell ``%%dispy --into preds`` run twice: the card of the run ``preds``
    holds read "preds (2)", a name nobody typed, and the next run "preds (3)". The
    newest card reads "preds", as typed; the earlier one, shown with it, "preds
    (1)"."""
    from dispynb.monitoring import live_clusters
    from tests.jupyter.shell import cell, shell_on

    tracker = ClusterTracker(live_clusters)
    body = "def double(x):\n    return 2 * x"
    try:
        with shell_on(local) as shell:
            cell(shell, '--over "range(2)" --into preds', body)
            first = shell.user_ns["preds"]
            (card,) = tracker.snapshots()
            assert card["name"] == "preds", card
            cell(shell, '--over "range(3)" --into preds', body)
            second = shell.user_ns["preds"]
            assert second is not first and second.results == [0, 2, 4]
            names = {c["id"]: c["name"] for c in tracker.snapshots()}
            assert names == {
                second.cluster.uid: "preds",
                first.cluster.uid: "preds (1)",
            }, names
    finally:
        tracker.close()


def test_a_nowait_run_map_card_loses_its_cancel_when_the_run_ends(
    local: LocalCluster, link_of: Any
) -> None:
    """``Run.map(..., wait=False)``, never waited for: once its jobs ended, its
    card kept a Cancel button (its cluster stayed open, with nothing to cancel,
    until the kernel ended). The run closes the cluster it owns when it is done."""
    from dispynb.jupyter.run import Run
    from dispynb.monitoring import live_clusters

    _, comm, _ = link_of(live_clusters)
    run = Run.map(jobs.square, range(3), nodes=local, wait=False, progress="none")
    card = comm.wait_for(state_of(run.cluster, lambda c: c["closed"]))
    assert card is not None
    assert run.closed and run.results == [0, 1, 4]
    assert run.wait(timeout=0)  # waiting for it afterwards still works
