"""Two nodes on one destination directory (its default, ``<tmp>/dispynb``, is every
node's of a user on the machine): one's file store is not the other's, nor its
kept results.

Real ``dispynb-node`` processes, real clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dispynb import DispyJob, JobCluster
from tests.api.test_recovery import (
    CLIENT,
    assert_every_job_recovered,
    kill_client_mid_run,
    recover_in_new_process,
)
from tests.jobs import wait_until
from tests.nodeproc import start_node
from tests.nodeserver.test_spool_race import keep_a_computation
from tests.ports import PortHolder

pytestmark = pytest.mark.slow


def size(data: bytes) -> int:
    return len(data)


def _stores(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name.startswith(".store-"))


def test_a_node_does_not_remove_the_files_another_nodes_jobs_use(tmp_path):
    """Node b released an object the client of node a had put too (the same data):
    b removed it from the store a uses, and a's next job failed ('was not sent to
    this node'). The second node keeps a store of its own, removed as it stops, or
    by the next node to start if it was killed."""
    dest = tmp_path / "dest"
    first = start_node(tmp_path / "a", "--dest-path", str(dest), name="a")
    try:
        second = start_node(tmp_path / "b", "--dest-path", str(dest), name="b")
        try:
            data = b"d" * 3_000_000
            with JobCluster(
                size, nodes=[first.spec], secret=first.secret, recover_file=False
            ) as on_first:
                mine = on_first.put(data)
                assert on_first.submit(mine)() == len(data)
                with JobCluster(
                    size, nodes=[second.spec], secret=second.secret,
                    recover_file=False,
                ) as on_second:  # fmt: skip
                    assert on_second.submit(on_second.put(data))() == len(data)
                job = on_first.submit(mine)
                assert job() == len(data), job.exception
                assert job.status == DispyJob.Finished
            assert "keeps its own in" in second.log_text()
            assert len(_stores(dest)) == 1
        finally:
            assert second.stop() == 0
        assert _stores(dest) == []  # removed as it stopped
        killed = start_node(tmp_path / "c", "--dest-path", str(dest), name="c")
        assert len(_stores(dest)) == 1
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait(30)
        assert len(_stores(dest)) == 1  # left behind
        again = start_node(tmp_path / "d", "--dest-path", str(dest), name="d")
        try:
            assert len(_stores(dest)) == 1  # its own: the killed one's went
        finally:
            assert again.stop() == 0
    finally:
        assert first.stop() == 0
    assert (dest / ".store").is_dir()  # the shared one stays


#: test_recovery's CLIENT on the two nodes given (comma-separated), 10 jobs on each,
#: waiting for a ``go`` file beside the marks.
CLIENT_OF_NODES = (
    CLIENT.replace("nodes=[sys.argv[1]]", 'nodes=sys.argv[1].split(",")')
    .replace(
        """jobs = [cluster.submit_job_id("job-%d" % n, n, sys.argv[4], all_slow)
        for n in range(20)]""",
        """for n in range(20):  # None until the cluster is connected to the node
    node = sys.argv[1].split(",")[n // 10]
    while cluster.submit_job_id_node("job-%d" % n, node, n, sys.argv[4], 0) is None:
        time.sleep(0.05)""",
    )
    .replace(
        "    time.sleep(1.0 if n % 2 or all_slow else 0.0)\n",
        "    go = os.path.join(marks, os.pardir, 'go')\n"
        "    deadline = time.monotonic() + 60\n"
        "    while not os.path.exists(go) and time.monotonic() < deadline:\n"
        "        time.sleep(0.01)\n",
    )
)


def test_nodes_sharing_a_dest_path_keep_each_its_own_results_for_recover_jobs(
    tmp_path: Path,
) -> None:
    """One client's computation on two nodes of one dest_path has the same recovery
    id on both: they kept its results in one spool, each removing the other's (the
    first node to hand its results to recover_jobs deleted the second's). Each now
    keeps its own: b, stopped while recover_jobs collects a's results, gives its own
    once started again on its port."""
    dest = tmp_path / "dest"
    first = start_node(tmp_path / "a", "--dest-path", str(dest), name="a", cpus=10)
    second = start_node(tmp_path / "b", "--dest-path", str(dest), name="b", cpus=10)
    try:
        both = SimpleNamespace(spec=f"{first.spec},{second.spec}", secret=first.secret)
        journal = kill_client_mid_run(
            tmp_path, both, started=20, client_script=CLIENT_OF_NODES
        )
        (tmp_path / "go").touch()  # the jobs end, their client gone: results kept
        assert second.stop() == 0  # drains: its jobs end, their results kept
        down = recover_in_new_process(tmp_path, journal, first.secret)
        assert down.returncode == 0, down.stderr
        jobs = json.loads(down.stdout)
        assert [job[2] for job in jobs].count(11) == 10, jobs  # b's: not reached
        (tmp_path / "b" / "port").unlink()
        second = start_node(
            tmp_path / "b", "--dest-path", str(dest), "--port", str(second.port),
            name="b", cpus=10,
        )  # fmt: skip
        done = recover_in_new_process(tmp_path, journal, first.secret)
    finally:
        second.stop()
        first.stop()
    assert_every_job_recovered(done)
    assert "a kept result is lost" not in first.log_text() + second.log_text()


def _kept_results(spool: Path) -> list[Path]:
    return sorted(spool.glob("*/r*"))


@pytest.mark.parametrize("end", ["stopped", "killed"])
def test_results_kept_by_a_node_that_never_returns_go_once_expired(
    tmp_path: Path, end: str
) -> None:
    """A node with a fixed --port keeps its crashed client's results, then stops
    (or is killed while their jobs run) and never returns: only a node of its port
    read its spool, so they stayed on the disk for ever. A node that starts in the
    directory now removes them once their time is over (an hour from the node's
    stop, or from their last write if it died), and not before."""
    dest = tmp_path / "dest"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gone = start_node(
        tmp_path / "gone", "--dest-path", str(dest), "--port", str(port), cpus=20
    )
    try:
        kill_client_mid_run(tmp_path, gone, started=20)
        wait_until(lambda: len(_kept_results(dest / ".kept")) >= 1)
    finally:
        gone.stop(signal.SIGTERM if end == "stopped" else signal.SIGKILL)
    kept = _kept_results(dest / ".kept")
    (spool,) = {path.parent for path in kept}
    meta = json.loads((spool / "meta").read_text())
    assert (meta["expires"] is None) == (end == "killed"), meta

    def start_other() -> str:
        (tmp_path / "other" / "port").unlink(missing_ok=True)
        other = start_node(tmp_path / "other", "--dest-path", str(dest))
        other.stop()
        return other.log_text()

    start_other()
    assert _kept_results(dest / ".kept") == kept  # their hour is not over
    if end == "stopped":
        meta["expires"] = time.time() - 1
        (spool / "meta").write_text(json.dumps(meta))
    else:
        an_hour_ago = time.time() - meta["keep"] - 1
        os.utime(spool, (an_hour_ago, an_hour_ago))
    log = start_other()
    assert _kept_results(dest / ".kept") == []
    assert "removed the expired results of 1 computation (" in log


def _spools(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name.startswith(".kept-"))


def test_a_node_of_a_fixed_port_leaves_no_empty_spool_behind(
    tmp_path: Path, held_port: PortHolder
) -> None:
    """Each fixed --port ever used beside another node left a ``.kept-*`` directory
    holding only its ``.port`` (9 on one machine, without limit on test machines):
    one holding no kept results is removed as its node stops; one holding some
    stays, and the next node of its port takes it back."""
    dest = tmp_path / "dest"
    first = start_node(tmp_path / "a", "--dest-path", str(dest))  # holds .kept
    try:
        for number in range(2):
            node = start_node(
                tmp_path / f"p{number}", "--dest-path", str(dest),
                "--port", str(held_port()),
            )  # fmt: skip
            assert len(_spools(dest)) == 1
            assert node.stop() == 0
            assert _spools(dest) == []

        port = str(held_port())
        node = start_node(tmp_path / "k", "--dest-path", str(dest), "--port", port)
        (spool,) = _spools(dest)
        keep_a_computation(str(dest / spool))
        assert node.stop() == 0
        assert _spools(dest) == [spool]
        (tmp_path / "k" / "port").unlink()
        node = start_node(tmp_path / "k", "--dest-path", str(dest), "--port", port)
        try:
            assert _spools(dest) == [spool]  # taken back, not another made
        finally:
            node.stop()
    finally:
        first.stop()


def test_a_node_on_another_port_says_whose_the_kept_spool_is(tmp_path):
    """A node started on another port than the last one on its directory (moved
    to another port, or --port 0) logged 'other nodes use the kept-results spools',
    no other node running: the admin looked for a node that was not there. The
    spool is kept for the node of the old port (its clients may come back)."""
    dest = tmp_path / "dest"
    holder = PortHolder()
    try:
        old, new = holder(), holder()
        first = start_node(tmp_path / "a", "--dest-path", str(dest), "--port", str(old))
        assert first.stop() == 0
        second = start_node(
            tmp_path / "b", "--dest-path", str(dest), "--port", str(new)
        )
        try:
            log = second.log_text()
        finally:
            assert second.stop() == 0
    finally:
        holder.close()
    assert "other nodes use" not in log and "running there" not in log, log
    assert (
        f"are kept for the node of port {old} (their clients' results wait for "
        "them to start again there): this node keeps its own in"
    ) in log, log
