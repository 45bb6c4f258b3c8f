"""`JobCluster.close`: dispy's ``close(timeout=None, terminate=False)`` (real node
processes; SIGSTOP for a node that does not answer).

Without ``terminate``, a ``timeout`` that passes with jobs not done makes ``close``
return False and leaves the cluster open, its jobs running, as dispy's. With
``terminate``, the jobs get ``timeout`` seconds (none without one), then what is not
done is cancelled and waited for at most `dispynb.cluster.TERMINATE_WAIT`. What a
node did not end by then ends Abandoned, named in one warning, and ``close`` returns
True (closed): before, ``close(terminate=True)`` waited until the client's watchdog
declared the stopped node dead (3 of its ``pulse_interval``: 3 minutes here).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispynb import DispyJob, DispyNode, JobCluster
from dispynb.cluster import TERMINATE_WAIT
from dispynb.scheduler.link import TERMINATE_CLOSE_TIMEOUT
from tests.jobs import WAIT, mark_and_hold, mark_and_sleep, wait_for_path
from tests.nodeproc import CliNode, running_node
from tests.sigint import main_waits_in_function, sigint_when

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: The clients' pulse: a stopped node is declared dead only after 3 of them (180 s),
#: far beyond what close may take.
LONG_PULSE = 60.0

#: What close may take beyond its wait: closing the nodes (their acknowledgement,
#: then the engine's tasks: 5 s at most each), and a loaded machine; far less than
#: the 180 s the watchdog takes to declare the stopped node dead.
CLOSING = TERMINATE_CLOSE_TIMEOUT + 30.0


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process ``pid`` stopped (SIGSTOP) until the block ends."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def close_in_thread(
    cluster: JobCluster, bound: float, **kwargs: object
) -> tuple[bool | None, float]:
    """``cluster.close(**kwargs)`` on a thread; its result and how long it took, or
    (None, bound) if it did not return within ``bound`` s."""
    outcome: list[bool] = []
    began = time.monotonic()
    thread = threading.Thread(
        target=lambda: outcome.append(cluster.close(**kwargs)),  # type: ignore[arg-type]
        daemon=True,
    )
    thread.start()
    thread.join(bound)
    took = time.monotonic() - began
    return (outcome[0] if outcome else None), took


@pytest.fixture
def node(tmp_path: Path) -> Iterator[CliNode]:
    with running_node(tmp_path / "node", name="stopped") as proc:
        yield proc


def start_job(node: CliNode, tmp_path: Path) -> tuple[JobCluster, DispyJob]:
    cluster = JobCluster(
        mark_and_sleep, nodes=[node.spec], secret=node.secret, pulse_interval=LONG_PULSE
    )
    marker = tmp_path / "started"
    job = cluster.submit(str(marker), 300)
    wait_for_path(marker)
    return cluster, job


def test_close_terminate_gives_up_on_a_stopped_node_in_bounded_time(
    node: CliNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cluster, job = start_job(node, tmp_path)
    caplog.set_level(logging.WARNING, logger="dispynb.cluster")
    with stopped(node.proc.pid):
        done, took = close_in_thread(cluster, TERMINATE_WAIT + CLOSING, terminate=True)
    assert done is True, f"close(terminate=True) returned {done} after {took:.0f} s"
    assert took >= TERMINATE_WAIT - 1
    assert job.finish.wait(WAIT)
    assert job.status == DispyJob.Abandoned
    assert "closed before its node ended it" in str(job.exception)
    warnings = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "1 job(s) not done after 10 s abandoned" in warnings[0]
    assert "on 127.0.0.1" in warnings[0]


def test_the_warning_names_the_node_of_a_job_sent_but_never_reported_started(
    node: CliNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job sent to a node that stopped before it could report the start is named
    with that node, as dispy's ``ip_addr`` is set at dispatch, not "(queued)" (the
    CI run of 2026-12-05 met this race in the test above)."""
    cluster = JobCluster(
        mark_and_sleep, nodes=[node.spec], secret=node.secret, pulse_interval=LONG_PULSE
    )
    first = cluster.submit(str(tmp_path / "first"), 0)
    assert first.finish.wait(WAIT) and first.status == DispyJob.Finished
    caplog.set_level(logging.WARNING, logger="dispynb.cluster")
    with stopped(node.proc.pid):
        job = cluster.submit(str(tmp_path / "second"), 300)
        done, took = close_in_thread(
            cluster, 2 + TERMINATE_WAIT + CLOSING, timeout=2, terminate=True
        )
    assert done is True, f"close returned {done} after {took:.0f} s"
    assert job.finish.wait(WAIT)
    assert job.status == DispyJob.Abandoned
    warnings = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"{job.id!r} on 127.0.0.1" in warnings[0], warnings[0]
    assert job.ip_addr == "127.0.0.1"


def test_close_with_a_timeout_returns_false_and_leaves_the_cluster_open(
    node: CliNode, tmp_path: Path
) -> None:
    """As dispy's: ``close(timeout=T)`` returns False once ``T`` passes with a job
    not done, the job runs on (its result arrives) and the cluster takes more jobs;
    a later ``close()`` waits for them and returns True. Before, the first close
    closed the cluster: the job ended Abandoned."""
    cluster = JobCluster(mark_and_hold, nodes=[node.spec], secret=node.secret)
    marker, release = tmp_path / "started", tmp_path / "release"
    job = cluster.submit(str(marker), str(release), 300)
    wait_for_path(marker)
    done, took = close_in_thread(cluster, 1 + CLOSING, timeout=1)
    assert done is False, f"close(timeout=1) returned {done} after {took:.0f} s"
    assert job.status == DispyJob.Running
    release.touch()
    assert job.finish.wait(WAIT)
    assert job.status == DispyJob.Finished
    again = cluster.submit(str(tmp_path / "again"), str(release))
    done, took = close_in_thread(cluster, WAIT + CLOSING, timeout=WAIT)
    assert done is True, f"the second close returned {done} after {took:.0f} s"
    assert again.status == DispyJob.Finished


def test_close_terminate_gives_the_jobs_the_timeout_first(
    node: CliNode, tmp_path: Path
) -> None:
    """As dispy's: ``close(timeout=T, terminate=True)`` lets the jobs finish within
    ``T`` and cancels only what is still not done then. Before, it cancelled the job
    at once: Terminated."""
    cluster = JobCluster(mark_and_hold, nodes=[node.spec], secret=node.secret)
    marker = tmp_path / "started"
    job = cluster.submit(str(marker), str(tmp_path / "never"), 2)  # ends after 2 s
    wait_for_path(marker)
    done, took = close_in_thread(cluster, WAIT + CLOSING, timeout=WAIT, terminate=True)
    assert done is True, f"close returned {done} after {took:.0f} s"
    assert job.status == DispyJob.Finished


def stubborn(marker: str) -> int:
    """Ignore SIGTERM and SIGINT (a cancel's first signals), say so, sleep."""
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    open(marker, "w").close()
    time.sleep(300)
    return 0


def test_close_terminate_waits_for_a_node_that_kills_a_stubborn_job(
    node: CliNode, tmp_path: Path
) -> None:
    """The node kills a job that ignores the cancel's signals after its grace: well
    within `TERMINATE_WAIT`, so the job ends Terminated by its node, as before."""
    cluster = JobCluster(stubborn, nodes=[node.spec], secret=node.secret)
    marker = tmp_path / "started"
    job = cluster.submit(str(marker))
    wait_for_path(marker)
    done, took = close_in_thread(cluster, TERMINATE_WAIT + CLOSING, terminate=True)
    assert done is True, f"close returned {done} after {took:.0f} s"
    assert job.status == DispyJob.Terminated


def test_ctrl_c_while_close_waits_for_a_callback_still_closes_the_rest(
    node: CliNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while close() waits for a cluster_status callback still running (told
    of the node's Closed): close() raises KeyboardInterrupt, and the rest of the
    close is done all the same: the recovery file of a cluster whose jobs all
    ended is removed, the I/O loop released. Before, both were left (a later
    recover_jobs() found that file)."""
    monkeypatch.chdir(tmp_path)  # where the default recovery file goes
    told = threading.Event()
    release = threading.Event()

    def cluster_status(status: int, node: object, job: object) -> None:
        if status == DispyNode.Closed:
            told.set()
            release.wait(WAIT)

    cluster = JobCluster(
        abs, nodes=[node.spec], secret=node.secret, cluster_status=cluster_status
    )
    try:
        assert cluster.submit(-2)() == 2
        assert list(tmp_path.glob("_dispy_*"))
        closing = main_waits_in_function("close", "dispynb._callbacks")
        with (
            pytest.raises(KeyboardInterrupt),
            sigint_when(lambda: told.is_set() and closing()),
        ):
            cluster.close()
    finally:
        release.set()
    assert not list(tmp_path.glob("_dispy_*"))
