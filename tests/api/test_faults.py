"""Nodes that die, hang or come back; clients that go silent (real processes, loopback).

Multi-host versions of these (namespaces, cut links) are in tests/multihost.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import psutil
import pytest

from dispynb import DispyJob, DispyNode, JobCluster
from tests.jobs import computation_processes, jobs_held, wait_until
from tests.nodeproc import running_node, start_node

pytestmark = pytest.mark.slow

PULSE = 0.2


def slow_square(n: int) -> tuple[int, str]:
    import time

    time.sleep(0.3)
    return n * n, dispy_node_name  # type: ignore[name-defined]  # noqa: F821


class Events:
    """Records job_status calls per job id and when each node was closed."""

    def __init__(self) -> None:
        self.finals: collections.Counter[object] = collections.Counter()
        self.closed: dict[str, float] = {}
        self.lock = threading.Lock()

    def job_status(self, job: DispyJob) -> None:
        with self.lock:
            self.finals[job.id] += 1

    def cluster_status(self, status: int, node: DispyNode | None, job: object) -> None:
        if status == DispyNode.Closed and node is not None:
            self.closed.setdefault(node.name, time.monotonic())


def test_stopped_node_declared_dead_and_reentrant_jobs_complete_once(tmp_path, caplog):
    """... and a job run again says nothing at INFO, a line a job on a script's
    stderr (dispy's default level): dispy's says it at debug."""
    caplog.set_level(logging.INFO, logger="dispynb")
    events = Events()
    with (
        running_node(tmp_path / "a", name="a") as a,
        running_node(tmp_path / "b", name="b", secret=a.secret) as b,
    ):
        cluster = JobCluster(
            slow_square,
            nodes=[a.spec, b.spec],
            secret=a.secret,
            reentrant=True,
            pulse_interval=PULSE,
            job_status=events.job_status,
            cluster_status=events.cluster_status,
        )
        try:
            wait_until(lambda: len(cluster.status().nodes) == 2)
            jobs = [cluster.submit(n) for n in range(12)]
            wait_until(lambda: any(job.status == DispyJob.Running for job in jobs))
            a.proc.send_signal(signal.SIGSTOP)
            try:
                # A stopped process keeps its connections open: only its silence
                # (DEAD_AFTER pulses) can end it within the wait.
                wait_until(lambda: "a" in events.closed)
                assert cluster.wait(timeout=30)
            finally:
                a.proc.send_signal(signal.SIGCONT)
            assert all(job.status == DispyJob.Finished for job in jobs)
            assert sorted(job.result[0] for job in jobs) == [n * n for n in range(12)]
            # Jobs a had when it stopped ran again on b; each has one final result.
            cluster.wait()
            assert all(count == 1 for count in events.finals.values())
            assert len(events.finals) == 12
        finally:
            cluster.close()
    per_job = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO and "job" in r.getMessage()
    ]
    assert not per_job, per_job
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        text.startswith(f"node {a.spec} sent nothing for ")
        and text.endswith(": declared dead")
        for text in said
    ), said


def test_killed_node_jobs_not_reentrant_are_abandoned_with_reason(tmp_path):
    with (
        running_node(tmp_path / "a", name="a") as a,
        running_node(tmp_path / "b", name="b", secret=a.secret) as b,
        JobCluster(
            slow_square, nodes=[a.spec, b.spec], secret=a.secret, pulse_interval=PULSE
        ) as cluster,
    ):
        wait_until(lambda: len(cluster.status().nodes) == 2)
        jobs = [cluster.submit(n) for n in range(8)]
        wait_until(lambda: any(job.status == DispyJob.Running for job in jobs))
        a.proc.kill()
        assert cluster.wait(timeout=30)
    abandoned = [job for job in jobs if job.status == DispyJob.Abandoned]
    finished = [job for job in jobs if job.status == DispyJob.Finished]
    assert abandoned and finished
    assert len(abandoned) + len(finished) == 8
    assert all(a.spec in job.exception for job in abandoned)
    assert all(job.result[1] == "b" for job in finished)


def test_a_node_message_that_breaks_its_handler_costs_that_node_only(
    tmp_path, monkeypatch, allow_error_logs
):
    """A bug (here: a handler made to raise) while handling one node's message is
    logged with its traceback; that node's connection is dropped and its jobs end
    as a lost node's, while the other node and the cluster go on."""
    from dispynb.scheduler.driver import Driver

    events = Events()
    handle_results = Driver._on_results
    broken: list[str] = []

    def breaking(self, link, message, buffers):  # type: ignore[no-untyped-def]
        if link.node_id == a.spec and not broken:
            broken.append(link.node_id)
            raise RuntimeError("handler bug")
        return handle_results(self, link, message, buffers)

    monkeypatch.setattr(Driver, "_on_results", breaking)
    with (
        running_node(tmp_path / "a", name="a") as a,
        running_node(tmp_path / "b", name="b", secret=a.secret) as b,
        JobCluster(
            slow_square,
            nodes=[a.spec, b.spec],
            secret=a.secret,
            pulse_interval=PULSE,
            cluster_status=events.cluster_status,
        ) as cluster,
    ):
        wait_until(lambda: len(cluster.status().nodes) == 2)
        jobs = [cluster.submit(n) for n in range(8)]
        assert cluster.wait(timeout=30)
        assert broken == [a.spec]
        abandoned = [job for job in jobs if job.status == DispyJob.Abandoned]
        finished = [job for job in jobs if job.status == DispyJob.Finished]
        assert abandoned and len(abandoned) + len(finished) == 8
        assert all("handler bug" in job.exception for job in abandoned)
        assert all(a.spec in job.exception for job in abandoned)
        assert "b" not in events.closed and "a" in events.closed
        # The cluster goes on (node a, reconnected, too).
        more = [cluster.submit(n) for n in range(4)]
        assert [job()[0] for job in more] == [0, 1, 4, 9]
    errors = [r for r in allow_error_logs if "handling" in r.getMessage()]
    assert errors and errors[0].exc_info is not None
    assert a.spec in errors[0].getMessage()
    assert "handler bug" in str(errors[0].exc_info[1])


def test_node_restarted_on_same_port_is_used_again(tmp_path):
    first = start_node(tmp_path / "n", name="n")
    try:
        with JobCluster(
            slow_square, nodes=[first.spec], secret=first.secret, pulse_interval=PULSE
        ) as cluster:
            assert cluster.submit(2)()[0] == 4
            first.proc.kill()
            first.proc.wait()
            wait_until(lambda: not cluster.status().nodes)  # seen as lost
            waiting = cluster.submit(3)  # no node now: it waits for the node to return
            again = start_node(
                tmp_path / "n2",
                "--port",
                str(first.port),
                name="n",
                secret=first.secret,
            )
            try:
                assert waiting.wait(timeout=30)
                assert waiting.status == DispyJob.Finished, waiting.exception
                assert waiting.result == (9, "n")
            finally:
                cluster.close()
                again.stop()
    finally:
        if first.proc.poll() is None:
            first.proc.kill()


def square_when(n: int, go: str) -> int:
    import os
    import time

    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return n * n


def test_losing_the_last_node_says_the_jobs_wait_and_they_finish_when_it_is_back(
    tmp_path, caplog
):
    """The only node is killed under reentrant jobs: the warning says they wait for
    a node (before: only 'node ... left', then job() and wait() hung saying
    nothing); the node restarted with the same command line runs them."""
    go = tmp_path / "go"
    first = start_node(tmp_path / "n", name="n", cpus=2)
    again = None
    try:
        with JobCluster(
            square_when,
            nodes=[first.spec],
            secret=first.secret,
            reentrant=True,
            pulse_interval=PULSE,
        ) as cluster:
            jobs = [cluster.submit(n, str(go)) for n in range(4)]
            wait_until(lambda: any(job.status == DispyJob.Running for job in jobs))
            first.proc.kill()
            first.proc.wait()
            wait_until(lambda: "no node left" in caplog.text)
            assert "4 unfinished jobs wait until one joins or comes back" in caplog.text
            (tmp_path / "n" / "port").unlink()
            again = start_node(
                tmp_path / "n", "--port", str(first.port), name="n", secret=first.secret
            )
            go.touch()
            assert cluster.wait(timeout=30)
        assert [job.result for job in jobs] == [0, 1, 4, 9]
    finally:
        for node in (first, again):
            if node is not None and node.proc.poll() is None:
                node.stop()


def test_cluster_status_sees_a_job_moved_off_a_killed_node_as_dispy_says_it(
    tmp_path,
):
    """A reentrant job whose node is killed runs again elsewhere: cluster_status
    sees Created, Running (on a), Abandoned (on a) with the job's copy Created, as
    dispy's reschedule_jobs says it, then Running (on b), Finished, each once
    (before: Created, as at submit; earlier: Running twice in a row)."""
    go = tmp_path / "go"
    seen: dict[object, list[tuple[int, str | None]]] = collections.defaultdict(list)
    lock = threading.Lock()

    def cluster_status(status: int, node: DispyNode | None, job: object) -> None:
        if isinstance(job, DispyJob):
            with lock:
                seen[job.id].append((int(status), node.name if node else None))
                if status == DispyJob.Abandoned:
                    seen[job.id].append((int(job.status), job.ip_addr))

    with (
        running_node(tmp_path / "a", name="a", cpus=2) as a,
        running_node(tmp_path / "b", name="b", cpus=2, secret=a.secret) as b,
        JobCluster(
            square_when,
            nodes=[a.spec, b.spec],
            secret=a.secret,
            reentrant=True,
            pulse_interval=PULSE,
            cluster_status=cluster_status,
        ) as cluster,
    ):
        wait_until(lambda: len(cluster.status().nodes) == 2)
        jobs = [cluster.submit(n, str(go)) for n in range(4)]
        wait_until(lambda: sum(job.status == DispyJob.Running for job in jobs) == 4)
        a.proc.kill()
        wait_until(lambda: len(cluster.status().nodes) == 1)  # a is seen as lost
        go.touch()
        assert cluster.wait(timeout=30)
    assert [job.result for job in jobs] == [0, 1, 4, 9]
    created, running, finished = DispyJob.Created, DispyJob.Running, DispyJob.Finished
    abandoned = DispyJob.Abandoned
    moved = [
        [(created, None), (running, "a"), (abandoned, "a"), (created, None),
         (running, "b"), (finished, "b")]
    ]  # fmt: skip
    stayed = [[(created, None), (running, "b"), (finished, "b")]]
    with lock:
        histories = [seen[job.id] for job in jobs]
    assert sorted(histories) == sorted(moved * 2 + stayed * 2), histories


CLIENT = """
import sys, time
import dispynb as dispy
def sleeper(_):
    import time
    time.sleep(120)
cluster = dispy.JobCluster(sleeper, nodes=[sys.argv[1]], secret=sys.argv[2])
cluster.submit(0)
print("submitted", flush=True)
time.sleep(120)
"""


def test_silent_client_computation_is_freed_by_node(tmp_path):
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    with running_node(tmp_path / "n", "--orphan-timeout", "1") as node:
        client = subprocess.Popen(
            [sys.executable, str(script), node.spec, node.secret],
            cwd=tmp_path,  # where a killed client leaves its recovery file
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "submitted"
            node_proc = psutil.Process(node.proc.pid)
            wait_until(lambda: len(computation_processes(node_proc)) >= 2)
            os.kill(client.pid, signal.SIGSTOP)  # alive, connected, silent
            wait_until(lambda: not computation_processes(node_proc), timeout=20)
            assert "silent" in node.log_text()
        finally:
            client.kill()
            client.wait()
            client.stdout.close()


def test_node_shutting_down_hands_back_jobs_that_did_not_start(tmp_path):
    """SIGTERM to one of two nodes: at most its running job is lost; every job it
    had queued runs on the other node (not reentrant: they never started)."""
    with (
        running_node(tmp_path / "a", "--drain-timeout", "0", name="a") as a,
        running_node(tmp_path / "b", name="b", secret=a.secret) as b,
        JobCluster(
            slow_square, nodes=[a.spec, b.spec], secret=a.secret, pulse_interval=PULSE
        ) as cluster,
    ):
        wait_until(lambda: len(cluster.status().nodes) == 2)
        jobs = [cluster.submit(n) for n in range(16)]
        node_a = next(n for n in cluster.status().nodes if n.name == "a")
        wait_until(lambda: jobs_held(cluster, node_a) >= 2)  # some queued
        assert a.stop() == 0  # SIGTERM: a graceful shutdown
        assert cluster.wait(timeout=30)
    abandoned = [job for job in jobs if job.status == DispyJob.Abandoned]
    finished = [job for job in jobs if job.status == DispyJob.Finished]
    assert len(abandoned) <= 1  # the job running on a when it stopped
    assert len(finished) + len(abandoned) == 16
    assert sorted(job.result[0] for job in finished) == sorted(
        job._args[0] ** 2 for job in finished
    )
    assert any(job.result[1] == "b" for job in finished)


def timed_square(
    n: int, seconds: float, started: str | None = None
) -> tuple[int, str, float, float]:
    """``n * n`` after ``seconds``, the node's name, when it ended and began."""
    import os
    import time

    began = time.time()
    if started is not None:  # a directory: say this job started, and where
        with open(os.path.join(started, f"{dispy_node_name}-{n}"), "w"):  # type: ignore[name-defined]  # noqa: F821
            pass
    time.sleep(seconds)
    return n * n, dispy_node_name, time.time(), began  # type: ignore[name-defined]  # noqa: F821


def test_draining_node_finishes_running_jobs_and_gets_no_more(tmp_path, caplog):
    """SIGTERM with --drain-timeout: the running job ends on the node, queued ones
    come back and run elsewhere, and nothing is lost, abandoned or run twice."""
    caplog.set_level(logging.WARNING, logger="dispynb")
    events = Events()
    with (
        running_node(tmp_path / "a", "--drain-timeout", "20", name="a") as a,
        running_node(tmp_path / "b", name="b", secret=a.secret) as b,
        JobCluster(
            timed_square,
            nodes=[a.spec, b.spec],
            secret=a.secret,
            pulse_interval=PULSE,
            job_status=events.job_status,
            cluster_status=events.cluster_status,
        ) as cluster,
    ):
        wait_until(lambda: len(cluster.status().nodes) == 2)
        started = tmp_path / "started"
        started.mkdir()
        jobs = [cluster.submit(n, 1.5, str(started)) for n in range(16)]
        node_a = next(n for n in cluster.status().nodes if n.name == "a")
        wait_until(lambda: jobs_held(cluster, node_a) >= 2)  # some queued
        # a job really runs on a (a 1.5 s job: it is still running at the signal)
        wait_until(lambda: any(p.name.startswith("a-") for p in started.iterdir()))
        signalled = time.time()
        a.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "draining" in a.log_text())
        late = [cluster.submit(n, 0.0) for n in range(16, 20)]  # while a drains
        assert a.proc.wait(timeout=20) == 0
        assert "drained: every running job ended" in a.log_text()
        assert cluster.wait(timeout=30)
        cluster.wait()
    everything = jobs + late
    counts = collections.Counter(job.status for job in everything)
    print(f"drain: submitted {len(everything)}, counts {dict(counts)}")
    assert counts == {DispyJob.Finished: 20}, [j.exception for j in everything]
    assert sorted(job.result[0] for job in everything) == [n * n for n in range(20)]
    assert all(count == 1 for count in events.finals.values())
    assert len(events.finals) == 20
    # The job a was running when it was signalled ended there, after the signal.
    on_a = [job for job in everything if job.result[1] == "a"]
    assert any(job.result[2] > signalled for job in on_a)
    # Nothing started on a after the signal: a job it took then would have begun
    # when a CPU of it freed, 1.5 s after those running (it was their end - 1.5 s,
    # which a loaded machine's late wake-up pushed past the signal).
    assert all(job.result[3] < signalled + 1.0 for job in on_a)
    assert all(job.result[1] == "b" for job in late)
    # a was not declared dead while it drained: closed when it exited.
    assert "a" in events.closed
    assert not [m for m in caplog.messages if "declared dead" in m], caplog.messages


def test_second_signal_or_drain_timeout_terminates_running_jobs(tmp_path):
    with (
        running_node(tmp_path / "a", "--drain-timeout", "60", name="a") as a,
        running_node(tmp_path / "b", "--drain-timeout", "0.5", name="b") as b,
        JobCluster(
            timed_square, nodes=[a.spec, b.spec], secret=a.secret, pulse_interval=PULSE
        ) as cluster,
    ):
        wait_until(lambda: len(cluster.status().nodes) == 2)
        jobs = [cluster.submit(n, 50.0) for n in range(2)]  # one on each node
        wait_until(lambda: all(j.status == DispyJob.Running for j in jobs))
        a.proc.send_signal(signal.SIGTERM)
        b.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "draining" in a.log_text())
        # b ends on its 0.5 s drain timeout, not its job's 50 s.
        assert b.proc.wait(timeout=15) == 0
        assert a.proc.poll() is None  # still draining: up to 60 s
        a.proc.send_signal(signal.SIGINT)
        assert a.proc.wait(timeout=15) == 0
        assert cluster.wait(timeout=15)
    assert "drain timeout" in b.log_text()
    assert "on request" in a.log_text()
    assert all(job.status == DispyJob.Abandoned for job in jobs)


def poison_or_square(n: int) -> tuple[int, str]:
    """Job 0 kills the node server running it (SIGKILL); the others square."""
    import os
    import signal
    import time

    import psutil

    if n == 0:
        for parent in psutil.Process().parents():
            # Not the computation process or the zygote (nodeserver.zygote): named.
            if parent.cmdline()[1:3] == ["-m", "nodeserver"] and parent.name() not in (
                "dispynb-compute",
                "dispynb-zygote",
            ):
                os.kill(parent.pid, signal.SIGKILL)
        os._exit(1)
    time.sleep(0.1)
    return n * n, dispy_node_name  # type: ignore[name-defined]  # noqa: F821


def test_poison_job_is_abandoned_after_max_attempts_others_complete(tmp_path):
    """A reentrant job that kills every node running it stops after max_attempts
    nodes; its reason names them; every other job ends exactly once."""
    events = Events()
    names = ["a", "b", "c", "d"]
    with contextlib.ExitStack() as stack:
        nodes = [stack.enter_context(running_node(tmp_path / n, name=n)) for n in names]
        cluster = stack.enter_context(
            JobCluster(
                poison_or_square,
                nodes=[node.spec for node in nodes],
                secret=nodes[0].secret,
                reentrant=True,
                max_attempts=3,
                pulse_interval=PULSE,
                job_status=events.job_status,
                cluster_status=events.cluster_status,
            )
        )
        wait_until(lambda: len(cluster.status().nodes) == 4)
        jobs = [cluster.submit(n) for n in range(31)]
        assert cluster.wait(timeout=40)
        cluster.wait()
        killed = sorted(
            n
            for n, node in zip(names, nodes, strict=True)
            if node.proc.poll() is not None
        )
    poison, others = jobs[0], jobs[1:]
    assert poison.status == DispyJob.Abandoned
    assert "abandoned after 3 attempts" in poison.exception
    assert "raise max_attempts (now 3)" in poison.exception
    by_spec = {node.spec: name for name, node in zip(names, nodes, strict=True)}
    named = sorted(name for spec, name in by_spec.items() if spec in poison.exception)
    assert len(killed) == 3 and named == killed  # the nodes it took down
    assert all(count == 1 for count in events.finals.values())
    assert len(events.finals) == 31
    finished = [job for job in others if job.status == DispyJob.Finished]
    # A job sent ahead to the nodes it killed may share the poison's fate: it is
    # abandoned with the same reason, never lost or run twice.
    collateral = [job for job in others if job.status != DispyJob.Finished]
    assert all(
        job.status == DispyJob.Abandoned and "max_attempts" in job.exception
        for job in collateral
    )
    assert all(job.result[0] == job._args[0] ** 2 for job in finished)
    print(
        f"poison: submitted 31, finished {len(finished)}, abandoned poison 1, "
        f"collateral {len(collateral)}, lost 0, duplicated 0, nodes killed {killed}"
    )


def journaled_ends(path) -> int:
    """How many jobs a client's recovery journal has recorded ended."""
    from dispynb.journal import Journal

    journal = Journal.open_existing(str(path))
    assert journal is not None
    try:
        ((recovery_id, _name, _nodes),) = journal.computations()
        return sum(job.done() for _key, job, _node in journal.jobs(recovery_id))
    finally:
        journal.close()


def test_kept_results_survive_a_node_restart_and_are_removed_when_collected(tmp_path):
    """Goal row 12: the client is killed, the node restarted; recovery still gets
    every result (spooled on disk), once, and the spool is emptied afterwards."""
    from tests.api.test_recovery import CLIENT as RECOVERABLE
    from tests.api.test_recovery import RECOVER

    journal, marks = tmp_path / "journal.db", tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "client.py").write_text(RECOVERABLE)
    (tmp_path / "recover.py").write_text(RECOVER)
    node = start_node(tmp_path / "node", cpus=20)
    kept = tmp_path / "node" / "dest" / ".kept"
    try:
        client = subprocess.Popen(
            [sys.executable, "client.py", node.spec, node.secret, str(journal),
             str(marks), "mixed"],
            cwd=tmp_path, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "submitted"
            wait_until(lambda: len(list(marks.iterdir())) == 20)
            client.kill()
            client.wait()
        finally:
            client.kill()
            client.stdout.close()  # type: ignore[union-attr]
        # Every result the client had not journaled is on disk, in private files,
        # before the node stops (those it journaled and said so are not kept).
        unjournaled = 20 - journaled_ends(journal)
        wait_until(lambda: len(list(kept.glob("*/r*"))) >= unjournaled)
        assert len(list(kept.glob("*/r*"))) <= 20
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in kept.glob("*/*"))
        assert node.stop() == 0
        (tmp_path / "node" / "port").unlink()
        node = start_node(
            tmp_path / "node", "--port", str(node.port), cpus=20, secret=node.secret
        )
        assert "offered to its client until" in node.log_text()
        done = subprocess.run(
            [sys.executable, "recover.py", str(journal), node.secret],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        jobs = json.loads(done.stdout)
        assert [job[1] for job in jobs] == list(range(20))
        assert [job[2] for job in jobs] == [DispyJob.Finished] * 20
        assert [job[3] for job in jobs] == [n * n for n in range(20)]
        # Collected: the spool is emptied (once the results are on their way); it
        # keeps the mark of the node's port that holds it (`nodeserver.spoolclaim`).
        wait_until(lambda: [p.name for p in kept.iterdir()] == [".port"])
        print("restart recovery: submitted 20, recovered 20, lost 0, duplicated 0")
    finally:
        node.stop()


def stay_on_a(n: int) -> tuple[int, str]:
    import time

    if dispy_node_name == "a":  # type: ignore[name-defined]  # noqa: F821
        time.sleep(120)  # until its node is stopped
    return n, dispy_node_name  # type: ignore[name-defined]  # noqa: F821


def test_stop_signal_to_every_process_of_a_node_loses_its_running_job(tmp_path):
    """SLURM (walltime, scancel) and systemd send SIGTERM to every process of a
    node's job step or unit at once, its job workers included: a reentrant job that
    signal killed is lost with the node and finishes on the other one, instead of
    failing as 'killed by SIGTERM'."""
    with (
        running_node(tmp_path / "a", name="a") as a,
        running_node(tmp_path / "b", name="b", secret=a.secret) as b,
        JobCluster(
            stay_on_a,
            nodes=[a.spec, b.spec],
            secret=a.secret,
            reentrant=True,
            pulse_interval=PULSE,
        ) as cluster,
    ):
        wait_until(lambda: len(cluster.status().nodes) == 2)
        node_a = next(n for n in cluster.status().nodes if n.name == "a")
        jobs = [cluster.submit(n) for n in range(6)]
        # Node a's own list: both nodes are 127.0.0.1, so a job's ip_addr cannot
        # tell a job running on a from one running (briefly) on b.
        wait_until(
            lambda: (
                any(j.status == DispyJob.Running for j in cluster.node_jobs(node_a))
                and any(j.status == DispyJob.Finished for j in jobs)
            )
        )
        tree = psutil.Process(a.proc.pid)
        for proc in [tree, *tree.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGTERM)
        assert cluster.wait(timeout=30)
    assert [job.status for job in jobs] == [DispyJob.Finished] * 6
    assert sorted(job.result for job in jobs) == [(n, "b") for n in range(6)]
