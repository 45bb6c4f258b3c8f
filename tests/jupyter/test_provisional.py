"""Provisional results in runs: counted apart from done jobs, latest value per job in
the progress, the HTML and ``run.df``."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from dispynb.job import DispyJob, JobStatus
from dispynb.jupyter.display import format_counts
from dispynb.jupyter.progress import ProgressCounts, WidgetProgressBar
from dispynb.jupyter.run import Run
from tests import jobs
from tests.jupyter.helpers import provisional_then_wait
from tests.jupyter.shell import shell_on

WAIT = jobs.WAIT


class FakeCluster:
    """Returns jobs without running them; the test plays the cluster's events."""

    def submit(self, *args: object) -> DispyJob:
        return DispyJob(None, args, {})


def provisional(run: Run, job: DispyJob, value: object) -> None:
    job._set_provisional(value)
    run._on_cluster_status(JobStatus.ProvisionalResult, None, copy.copy(job))


def test_provisional_results_are_counted_without_ending_the_job():
    run = Run(name="p")
    run.attach(FakeCluster())  # type: ignore[arg-type]
    first, second = run.submit_all([1, 2])
    run._on_cluster_status(JobStatus.Running, None, copy.copy(first))

    for value in (0.25, 0.5, 0.75):
        provisional(run, first, value)

    counts = run.counts()
    assert (counts.provisional, counts.finished, counts.running) == (3, 0, 1)
    assert counts.latest == "input 0: 0.75"
    assert not run.done()
    assert run.provisional == {0: 0.75}
    assert "3 provisional (latest input 0: 0.75)" in format_counts(counts)
    html = run._repr_html_()
    assert "latest provisional results of 1 jobs" in html
    assert "0.75" in html

    first._complete(JobStatus.Finished, result=1.0)
    run._on_cluster_status(JobStatus.Finished, None, copy.copy(first))
    provisional(run, second, "late")  # a job may send them before Running is seen
    frame = run.df
    assert list(frame["provisional"]) == [0.75, "late"]
    assert frame.loc[0, "result"] == 1.0
    assert run.counts().finished == 1


def test_a_provisional_result_after_the_final_one_is_ignored():
    run = Run()
    run.attach(FakeCluster())  # type: ignore[arg-type]
    [job] = run.submit_all([1])
    job._complete(JobStatus.Finished, result=2)
    run._on_cluster_status(JobStatus.Finished, None, copy.copy(job))

    late = copy.copy(job)
    late.result = "stale"
    run._on_cluster_status(JobStatus.ProvisionalResult, None, late)

    assert run.counts().provisional == 0
    assert run.provisional == {}


def test_counts_text_without_provisional_results_is_unchanged():
    assert "provisional" not in format_counts(ProgressCounts(total=2, finished=1))


# --- on local nodes --------------------------------------------------------------


@pytest.mark.slow
def test_live_run_shows_three_provisional_results_then_the_final_one(local, tmp_path):
    gate = tmp_path / "gate"
    run = Run.map(
        provisional_then_wait,
        [(str(gate), 3)],
        nodes=local,
        unpack=True,
        wait=False,
        progress="none",
    )
    bar = WidgetProgressBar("prov", interval=0.01)
    run.live(bar, None)

    jobs.wait_until(lambda: run.counts().provisional == 3)
    jobs.wait_until(lambda: "3 provisional" in bar.label.value)
    counts = run.counts()
    assert (counts.finished, counts.running, counts.total) == (0, 1, 1)
    assert "(latest input 0: 2)" in bar.label.value
    assert bar.bar.value == 0  # not done
    assert run.provisional == {0: 2}
    assert "latest provisional" in run._repr_html_()

    gate.write_text("go")
    jobs.wait_until(lambda: bar.bar.bar_style == "success")
    run.close()
    assert run.results == ["done"]
    frame = run.df
    assert frame.loc[0, "provisional"] == 2
    assert frame.loc[0, "status"] == "Finished"


@pytest.fixture(scope="module")
def ip(local) -> Iterator[InteractiveShell]:
    with shell_on(local) as shell:
        yield shell


@pytest.mark.slow
def test_magic_progress_shows_provisional_count_and_df_has_the_column(ip):
    with capture_output() as captured:
        ip.run_cell_magic(
            "dispy",
            '--over "[1, 2]" --into steps --progress text',
            (
                "def steps(n):\n"
                "    for i in range(3):\n"
                "        dispy_provisional_result(n * 100 + i)\n"
                "    return n\n"
            ),
        )

    run = ip.user_ns["steps"]
    assert run.results == [1, 2]
    assert run.counts().provisional == 6
    final = captured.stderr.strip().splitlines()[-1]
    assert "2/2 done" in final
    assert "6 provisional (latest input" in final
    assert list(run.df["provisional"]) == [102, 202]
