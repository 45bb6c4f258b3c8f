"""`Run` on real local nodes: results, DataFrame, output routing, live widget state,
interrupts cancelling remote work, and the callbacks of a user's own cluster."""

from __future__ import annotations

import functools
import threading
from typing import Any

import pytest

from dispynb import JobCluster
from dispynb.errors import ClusterError, ConfigurationError, SerializationError
from dispynb.job import DispyJob, JobStatus
from dispynb.jupyter import runstop
from dispynb.jupyter.progress import TextProgressBar, WidgetProgressBar
from dispynb.jupyter.run import Run
from tests import jobs
from tests.jupyter.helpers import make_job, mark_sleep_mark, wait_then_return
from tests.sigint import sigint_when

WAIT = jobs.WAIT


# --- pure: no nodes ------------------------------------------------------------


class RacingCluster:
    """A stand-in cluster whose callback thread reports a job before ``submit``
    returns it (as the real one may)."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def submit(self, *args: object) -> DispyJob:
        job = make_job(*args, status=JobStatus.Finished, result=args[0])
        self.run._on_cluster_status(JobStatus.Running, None, job)
        self.run._on_cluster_status(JobStatus.Finished, None, job)
        return job


def test_run_events_before_submit_returns_are_counted():
    run = Run(name="race")
    run.attach(RacingCluster(run))  # type: ignore[arg-type]

    run.submit_all([1, 2])

    counts = run.counts()
    assert (counts.total, counts.finished, counts.running) == (2, 2, 0)
    assert run.done()
    assert run.results == [1, 2]


def test_run_empty_is_done():
    run = Run()
    assert run.done()
    assert run.wait(timeout=0)
    assert run.df.empty


# --- on local nodes ------------------------------------------------------------

slow = pytest.mark.slow


@slow
def test_run_map_results_and_frame(local):
    run = Run.map(jobs.square, range(6), nodes=local, progress="none")

    assert run.done() and run.closed
    assert run.results == [0, 1, 4, 9, 16, 25]
    frame = run.df
    assert list(frame["result"]) == run.results
    assert list(frame["args"]) == [(i,) for i in range(6)]
    assert set(frame["status"]) == {"Finished"}
    assert set(frame["node"]) == set(local.node_specs())
    assert (frame["duration"] >= 0).all()
    counts = run.counts()
    assert (counts.finished, counts.failed, counts.running, counts.queued) == (
        6,
        0,
        0,
        0,
    )


def node_name(_: int) -> str:
    import time

    time.sleep(0.05)  # both nodes get jobs
    return dispy_node_name  # type: ignore[name-defined]  # noqa: F821


@slow
def test_run_frame_tells_apart_nodes_of_one_address():
    """Two local nodes share 127.0.0.1: ``node`` names each job's node by address
    and port (the index of nodes_frame) and ``node_name`` by name (before: every
    row said 127.0.0.1, and no column said which node)."""
    from dispynb import LocalCluster
    from dispynb.jupyter.frames import nodes_frame

    with LocalCluster(nodes=2, cpus=1) as two:
        run = Run.map(node_name, range(8), nodes=two, progress="none")
        specs = {f"local-{i}": spec for i, spec in enumerate(two.node_specs())}
        with JobCluster(node_name, nodes=two) as cluster:
            jobs.wait_until(lambda: len(cluster.status().nodes) == 2)
            known = nodes_frame(cluster.status().nodes)
    frame = run.df
    assert set(run.results) == {"local-0", "local-1"}
    assert list(frame["node_name"]) == run.results
    assert list(frame["node"]) == [specs[name] for name in run.results]
    assert set(frame["node"]) == set(known.index)


async def _fetch(x: int) -> int:
    return x


def _each(x: int):  # type: ignore[no-untyped-def]
    yield x


@pytest.mark.parametrize(
    ("computation", "said"),
    [
        (_fetch, "_fetch is an async def function: each job would return a coroutine"),
        (_each, "_each yields: each job would return a generator, which cannot be"),
    ],
)
def test_run_map_refuses_a_function_whose_jobs_could_return_nothing(computation, said):
    """Each job returned a coroutine or a generator and failed, after a cluster
    was made and every job sent. Now Run.map says why before any of it."""
    with pytest.raises(ConfigurationError, match=said):
        Run.map(computation, range(3), nodes=["127.0.0.1:1"], progress="none")


@slow
def test_run_map_unpack_tuples_and_dicts(local):
    def add(a, b=0):
        return a + b

    run = Run.map(
        add,
        [(1, 2), [3, 4], {"a": 5, "b": 6}],
        nodes=local,
        unpack=True,
        progress="none",
    )

    assert run.results == [3, 7, 11]
    assert run.inputs[2] == ((), {"a": 5, "b": 6})


@slow
def test_run_wait_prints_remote_output_and_first_traceback_of_each_kind(local, capsys):
    def noisy(x):
        import sys

        print(f"out {x}")
        print(f"err {x}", file=sys.stderr)
        if x >= 1:
            raise ValueError(f"bad {x}")
        return x

    run = Run.map(noisy, range(3), nodes=local, name="noisy", progress="none")

    out, err = capsys.readouterr()
    assert sorted(out.splitlines()) == [f"[input {i}] out {i}" for i in range(3)]
    assert {f"[input {i}] err {i}" for i in range(3)} <= set(err.splitlines())
    assert err.count("Traceback (most recent call last)") == 1
    assert "ValueError: bad" in err
    assert "2 jobs failed (ValueError)" in err  # the second is counted, not repeated
    # Not 'see run.failures': no variable is known to hold it (a notebook's
    # run may be another run).
    assert "see the run's .failures or the run's .df.exception" in err, err
    assert [run.jobs.index(job) for job in run.failures] == [1, 2]
    assert list(run.df["stdout"]) == ["out 0\n", "out 1\n", "out 2\n"]


@slow
def test_a_second_runs_output_is_labelled_by_its_rows_not_by_job_ids(local, capsys):
    """What a job printed was labelled with its job id (``[job 4] out 0``), which
    the kernel counts over every run: in a second run, as in the first (ids from
    1), the label named no row of ``run.df``, indexed by input. It is labelled by
    its input's index, the row of ``run.df`` and ``run.jobs``."""
    Run.map(jobs.echo, ["a", "b"], nodes=local, progress="none")
    capsys.readouterr()

    second = Run.map(jobs.echo, ["x", "y", "z"], nodes=local, progress="none")

    out = capsys.readouterr().out.splitlines()
    assert sorted(out) == ["[input 0] out x", "[input 1] out y", "[input 2] out z"]
    assert [second.df.loc[i, "stdout"] for i in range(3)] == [
        "out x\n", "out y\n", "out z\n",
    ]  # fmt: skip
    assert second.df["id"].min() > 2  # job ids run on over the runs


def test_an_input_that_cannot_be_sent_is_named_by_its_row_in_a_run_with_jobs(local):
    """A run's second submit_all names the input that cannot be pickled by its row
    of ``run.df`` (as its output's label), not by its place in that call's list."""
    run = Run(name="more")
    with JobCluster(jobs.echo, nodes=local, **run.callbacks()) as cluster:
        run.attach(cluster)
        run.submit_all(["a", "b"])
        with pytest.raises(SerializationError) as raised:
            run.submit_all(["c", threading.Lock()])
        assert str(raised.value).startswith("input 3: job argument 1 cannot be sent")
        assert run.wait(timeout=WAIT)
        assert len(run.jobs) == 3


def ignore_stop_signals(x: int) -> int:
    """A job that ignores SIGTERM and SIGINT (and leaves its worker so)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return x


@slow
def test_a_run_of_jobs_that_ignore_sigterm_ends_without_waiting_for_them(
    tmp_path, monkeypatch
):
    """A run whose function ignores SIGTERM (as some libraries make it) took 2 s
    more each time: closing its cluster, the node's computation waited
    `nodeserver.compute.STOP_GRACE` for its idle workers to end on a SIGTERM
    they ignored. They are killed at once. (The node here gives them 600 s and
    the client waits as long for the node's close: before, the run could not
    end within the test's time limit.)"""
    import psutil

    from dispynb.scheduler import driver
    from tests.daemonhooks import node_with_graces
    from tests.nodeproc import start_node

    monkeypatch.setattr(driver, "CLOSE_TIMEOUT", 600.0)
    monkeypatch.setattr(driver, "TERMINATE_CLOSE_TIMEOUT", 600.0)

    node = start_node(tmp_path / "node", launcher=node_with_graces(stop=600), cpus=2)
    try:
        run = Run.map(
            ignore_stop_signals,
            range(4),
            nodes=[node.spec],
            secret=node.secret,
            progress="none",
        )
        assert run.results == [0, 1, 2, 3] and run.closed
        from nodeserver.zygote import ZYGOTE_NAME

        below = [  # (the zygote too: its command line names nodeserver.compute)
            proc
            for proc in jobs.computation_processes(psutil.Process(node.proc.pid))
            if proc.name() != ZYGOTE_NAME
        ]
        _gone, alive = psutil.wait_procs(below, timeout=WAIT)
        assert alive == []
    finally:
        assert node.stop() == 0, node.log_text()


@slow
def test_run_wait_echo_false_prints_nothing(local, capsys):
    Run.map(jobs.echo, ["x"], nodes=local, progress="none", wait=False).wait(echo=False)

    assert capsys.readouterr() == ("", "")


@slow
def test_run_text_progress_ends_with_final_counts(local):
    import io

    stream = io.StringIO()
    bar = TextProgressBar("sq", stream=stream)

    Run.map(jobs.square, range(4), nodes=local, progress=bar)

    assert stream.getvalue().endswith("\n")
    assert "4/4 done, 0 running, 0 queued" in stream.getvalue().splitlines()[-1]


@slow
def test_run_live_widget_state_follows_jobs(local1, tmp_path):
    gate = tmp_path / "gate"
    run = Run.map(
        wait_then_return,
        [(str(gate), "a"), (None, "b")],
        nodes=local1,
        unpack=True,
        wait=False,
        progress="none",
    )
    bar = WidgetProgressBar("live", interval=0.01)
    logged: list[tuple[str, str]] = []

    run.live(bar, lambda stream, text: logged.append((stream, text)))

    jobs.wait_until(lambda: "0/2 done" in bar.label.value and run.counts().running)
    jobs.wait_until(lambda: "0 running" not in bar.label.value)
    assert (bar.bar.value, bar.bar.max, bar.bar.bar_style) == (0, 2, "")

    gate.write_text("go")
    jobs.wait_until(lambda: bar.bar.bar_style == "success")

    assert (bar.bar.value, bar.bar.max) == (2, 2)
    assert "2/2 done" in bar.label.value
    run.close()  # joins the closer thread started when the last job ended
    assert run.closed
    assert run.results == ["a", "b"]


@slow
def test_run_interrupted_wait_cancels_remote_jobs(local1, tmp_path, capsys):
    started, finished = tmp_path / "started", tmp_path / "finished"
    run = Run.map(
        mark_sleep_mark,
        [(str(started), 30, str(finished)), (None, 0, None), (None, 0, None)],
        nodes=local1,
        unpack=True,
        wait=False,
        progress="none",
        name="long",
    )
    # A real SIGINT, as Ctrl-C (or the notebook's Stop) sends it.
    with (
        sigint_when(lambda: started.exists() and run._waiting),
        pytest.raises(KeyboardInterrupt) as stopped,
    ):
        run.wait()

    first, *queued = run.jobs
    assert first.status == JobStatus.Terminated, first.exception
    # Cancelled together with the running one: none started on the freed worker.
    assert [job.status for job in queued] == [JobStatus.Cancelled] * 2
    assert run.closed
    assert not finished.exists()
    message = str(stopped.value)
    assert message.startswith(
        "Interrupted: run 'long' stopped, 3 cancelled, 1 of them while running"
    )
    assert message.endswith("(0 of 3 jobs done)")
    assert not run.failures and run.counts().cancelled == 3
    assert stopped.value.run is run  # what finished stays reachable


@slow
def test_a_job_its_cluster_cancels_as_it_runs_counts_as_cancelled(
    local1, tmp_path, capsys
):
    """One job of a run cancelled while it runs through the run's cluster (dispy's
    ``cluster.cancel(job)``; the web monitor's Cancel of one job does the same):
    the run counted it failed, listed it in ``run.failures`` and printed 'job 1
    (input 0) failed: job terminated at the client's request'."""
    started, finished = tmp_path / "started", tmp_path / "finished"
    run = Run.map(
        mark_sleep_mark,
        [(str(started), 30, str(finished)), (None, 0, None)],
        nodes=local1,
        unpack=True,
        wait=False,
        progress="none",
        name="one",
    )
    jobs.wait_for_path(started)
    assert run.cluster is not None
    assert run.cluster.cancel(run.jobs[0]) == 0

    assert run.wait(timeout=WAIT)
    assert run.jobs[0].status == JobStatus.Terminated
    assert run.jobs[1].status == JobStatus.Finished
    counts = run.counts()
    assert (counts.finished, counts.cancelled, counts.failed) == (1, 1, 0), counts
    assert run.failures == []
    assert "failed" not in capsys.readouterr().err
    assert not finished.exists()


@slow
def test_stop_during_setup_ends_it_and_the_next_run_goes_at_once(local1, tmp_path):
    """Stop while the run's setup still runs on the node (a model loading): the
    setup's process and its child are gone once the KeyboardInterrupt arrives
    (before, the close waited 5 s for the node, and the setup ran on with its
    child), and the next run on the node works at once."""
    record, release = tmp_path / "record", tmp_path / "release"
    setup = functools.partial(jobs.hold_with_a_child, str(record), str(release))
    try:
        with sigint_when(record.exists), pytest.raises(KeyboardInterrupt):
            Run.map(jobs.square, range(4), nodes=local1, setup=setup, progress="none")
        pids = [int(pid) for pid in record.read_text().split()]
        assert jobs.still_running(pids) == []
    finally:
        release.touch()
    run = Run.map(jobs.square, range(4), nodes=local1, progress="none", wait=False)
    assert run.wait(timeout=WAIT)
    assert run.results == [0, 1, 4, 9]


@slow
def test_stop_while_the_run_starts_says_what_happened(local1, tmp_path):
    """Stop while Run.map still starts its cluster (its setup runs): the
    KeyboardInterrupt says that the run stopped before it started and that
    nothing is left running (before, its message was empty), and it is so."""
    record, release = tmp_path / "record", tmp_path / "release"
    setup = functools.partial(jobs.hold_with_a_child, str(record), str(release))
    try:
        with sigint_when(record.exists), pytest.raises(KeyboardInterrupt) as caught:
            Run.map(jobs.square, range(4), nodes=local1, setup=setup, progress="none")
        assert str(caught.value) == (
            "Interrupted: run 'square' stopped before it started (its cluster was "
            "starting); no job was sent and nothing is left running"
        )
        pids = [int(pid) for pid in record.read_text().split()]
        assert jobs.still_running(pids) == []
    finally:
        release.touch()


@slow
def test_stopping_a_run_cancels_its_jobs_in_one_request(local1, tmp_path):
    """Stop cancels every unfinished job of the run in one request: cancelled one
    by one, a queued job could start on the worker freed by the previous cancel
    and end Terminated (seen in the JupyterLab Stop test: 3 jobs Terminated
    on a node of 2 CPUs)."""
    started = tmp_path / "started"
    run = Run.map(
        mark_sleep_mark,
        [(str(started), 30, None)] + [(None, 30, None)] * 5,
        nodes=local1,
        unpack=True,
        wait=False,
        progress="none",
        name="six",
    )
    jobs.wait_until(started.exists)
    backend = run.cluster._backend
    requests: list[list[int]] = []
    cancel = backend.cancel

    def recorded(keys, *args, **kwargs):
        requests.append(list(keys))
        cancel(keys, *args, **kwargs)

    backend.cancel = recorded
    summary = run.stop(quiet=True)
    # (close(terminate=True) then finds nothing left to cancel.)
    assert [keys for keys in requests if keys] == [[job._key for job in run.jobs]]
    assert [job.status for job in run.jobs] == [JobStatus.Terminated] + [
        JobStatus.Cancelled
    ] * 5
    assert "6 cancelled, 1 of them while running (0 of 6 jobs done)" in summary


@slow
def _one_running_then_queued(local1, started, queued: int, name: str) -> Run:
    """A run of one job that marks ``started`` and ``queued`` behind it, not
    waited for."""
    return Run.map(
        mark_sleep_mark,
        [(str(started), 30, None)] + [(None, 30, None)] * queued,
        nodes=local1,
        unpack=True,
        wait=False,
        progress="none",
        name=name,
    )


def test_a_stopped_runs_queued_jobs_end_in_one_post(local1, tmp_path):
    """Stop of a run with many queued jobs: the cluster drops them in one go and
    tells its callback thread of all their ends in one post (it made two per job,
    the run's ``cluster_status`` with a copy of the job, then forgetting the
    cancel: a 200,000-job run's Stop spent seconds on them); each still reaches
    the run, and a listener of the run (with its own copy), once. Nor are the
    jobs' ``Created`` events posted: the run ignores them, and its listener gets
    them only if it reads jobs."""
    started = tmp_path / "started"
    queued = 40
    seen: list[tuple[int, DispyJob]] = []
    run = _one_running_then_queued(local1, started, queued, "many")
    assert run.cluster is not None
    dispatcher = run.cluster._callbacks
    assert dispatcher.flush(WAIT)
    run.add_listener(lambda status, node, job: seen.append((status, job)))
    posted: list[tuple[object, tuple[object, ...]]] = []
    post = dispatcher.post

    def counted(fn, *args):
        posted.append((fn, args))
        post(fn, *args)

    dispatcher.post = counted
    with (
        sigint_when(lambda: started.exists() and run._waiting),
        pytest.raises(KeyboardInterrupt),
    ):
        run.wait()

    assert run.counts().cancelled == queued + 1
    assert len(posted) < 10, posted
    ends = [job for status, job in seen if status == JobStatus.Cancelled]
    assert sorted(job.id for job in ends) == sorted(job.id for job in run.jobs[1:])
    assert not {id(job) for job in ends} & {id(job) for job in run.jobs}  # copies


@slow
def test_a_stop_whose_count_lags_ends_its_bar_with_the_final_counts(
    local1, tmp_path, monkeypatch
):
    """Stop: the nodes confirmed every cancel, but the run's count of them (its
    callbacks, behind a slow one of the user's here) was not done when Stop's wait
    ended: the bar ended with jobs still queued (seen in JupyterLab: '45208
    queued, ETA 15:23:50' after the Stop of a 200,000-job run on a loaded
    machine). It now waits for the count too."""
    # Long enough for the node to confirm the running job's end (the queued ones
    # end at once), shorter than the user's callback takes.
    monkeypatch.setattr(runstop, "CANCEL_WAIT", 3.0)
    gate = threading.Event()

    def slow(status: int, node: object, job: DispyJob | None) -> None:
        if status == JobStatus.Cancelled:
            gate.wait(WAIT)

    started = tmp_path / "started"
    run = Run.map(
        mark_sleep_mark,
        [(str(started), 30, None)] + [(None, 30, None)] * 3,
        nodes=local1,
        unpack=True,
        wait=False,
        progress="none",
        cluster_status=slow,
        name="lagging",
    )
    finished: list[Any] = []
    finish = run.bar.finish
    run.bar.finish = lambda counts: (finished.append(counts), finish(counts))
    jobs.wait_until(started.exists)
    threading.Timer(4.5, gate.set).start()
    run.stop(quiet=True)
    assert finished, "the bar was not finished"
    counts = finished[0]
    assert (counts.cancelled, counts.running, counts.total) == (4, 0, 4), counts


@slow
def test_a_runs_created_events_go_only_where_they_are_read(local):
    """A run ignores its jobs' ``Created`` events: the cluster no longer copies
    and posts one per submit for it (~5 us a job), unless the run passes events
    on to a ``cluster_status`` of the user's, which still gets each."""
    created: list[object] = []

    def mine(status: int, node: object, job: DispyJob | None) -> None:
        if status == JobStatus.Created and job is not None:
            created.append(job.id)

    for own in (None, mine):
        run = Run(name="r", cluster_status=own)
        statuses: list[object] = []
        with JobCluster(jobs.square, nodes=local, **run.callbacks()) as cluster:
            run.attach(cluster)
            post = cluster._callbacks.post

            def counted(fn, *args, post=post, statuses=statuses):
                statuses.append(args[0] if args else None)
                post(fn, *args)

            cluster._callbacks.post = counted
            run.submit_all(range(3))
            assert run.wait(timeout=WAIT, echo=False)
        assert run.results == [0, 1, 4]
        assert statuses.count(JobStatus.Created) == (0 if own is None else 3)
    assert len(created) == 3


@slow
def test_run_follows_a_users_cluster_and_chains_callbacks(local):
    seen_jobs: list[DispyJob] = []
    seen_events: list[int] = []
    run = Run(
        name="mine",
        job_status=seen_jobs.append,
        cluster_status=lambda status, node, job: seen_events.append(status),
    )

    with JobCluster(jobs.square, nodes=local, **run.callbacks()) as cluster:
        run.attach(cluster)
        run.submit_all(range(4))
        assert run.wait(timeout=WAIT, echo=False)
        assert not run.closed  # the user's cluster stays open

    assert run.results == [0, 1, 4, 9]
    assert sorted(job.result for job in seen_jobs) == [0, 1, 4, 9]
    assert seen_events.count(JobStatus.Finished) == 4


@slow
def test_run_repr_and_html(local):
    run = Run.map(
        jobs.raise_value_error,
        [1],
        nodes=local,
        name="bad",
        progress="none",
        wait=False,
    )
    run.wait(echo=False)

    assert repr(run).startswith("<Run 'bad' 0/1 done, 1 failed")
    html = run._repr_html_()
    assert "Run bad" in html
    # By input, the row of run.df, as the cell's output says it (was: 'job 7').
    assert f"1 failed; first: input 0 (job {run.jobs[0].id}) on" in html
    # The node by name and port, as the cell's line says it (before: 127.0.0.1).
    host, port = local.addresses[0]
    assert f"on local-0 ({host}:{port})" in html, html
    assert "ValueError: bad value 1" in html


def test_a_stopped_runs_queued_jobs_are_counted_together(local1, tmp_path):
    """The cancel of a Stop's queued jobs reached the run one job at a time, each
    taking its lock and drawing (a 200,000-job Stop: ~0.45 s of the callback
    thread's CPU); the run counts them together and draws once, and its bar ends
    with every job cancelled."""
    started = tmp_path / "started"
    queued = 40
    run = _one_running_then_queued(local1, started, queued, "together")
    assert run.cluster is not None
    assert run.cluster._callbacks.flush(WAIT)
    jobs.wait_for_path(started)
    notified = []
    notify = run._notify

    def counted() -> None:
        notified.append(1)
        notify()

    run._notify = counted
    run.stop(quiet=True)
    assert run.done() and run.counts().cancelled == queued + 1
    assert len(notified) < 10, len(notified)


def test_a_run_submitted_to_after_its_cluster_closed_says_why(local1):
    """``Run.map(..., wait=False)`` closes the cluster it made once its jobs have
    ended (so does `wait`): more submitted to the run then were refused with the
    cluster's 'create a new JobCluster', of a cluster the user never made. The run
    says it closed it and what to do instead, and loses nothing it had."""
    run = Run.map(jobs.square, range(2), nodes=local1, progress="none", wait=False)
    assert run.wait(timeout=WAIT, echo=False)
    with pytest.raises(ClusterError, match=r"run 'square' closed the cluster") as err:
        run.submit(5)
    assert "Run.map" in str(err.value) and "JobCluster" in str(err.value)
    with pytest.raises(ClusterError, match=r"run 'square' closed the cluster"):
        run.submit_node("local-0", 5)
    assert run.results == [0, 1] and len(run.jobs) == 2
    stopped = Run.map(jobs.square, [3], nodes=local1, progress="none", wait=False)
    stopped.close(terminate=True)  # (as a Stop closes it): not said to have ended
    with pytest.raises(ClusterError, match=r"stopped or closed\): give the new"):
        stopped.submit(5)
