"""Jobs and nodes as DataFrames: columns, dtypes, contents, expansion."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, NamedTuple

import pandas as pd
import pytest

from dispynb.job import JobStatus
from dispynb.jupyter.frames import (
    JOB_COLUMNS,
    STATUS_DTYPE,
    expand_results,
    jobs_frame,
    nodes_frame,
)
from dispynb.node import DispyNode
from tests.jupyter.helpers import make_job


@pytest.fixture
def jobs():
    return [
        make_job(2, status=JobStatus.Finished, result=4, stdout="two\n"),
        make_job(
            3,
            status=JobStatus.Terminated,
            exception="Traceback (most recent call last):\nValueError: 3",
            stderr=b"raw \xff bytes",
        ),
        make_job(4, status=JobStatus.Running),
        make_job(5, scale=2),
    ]


def test_jobs_frame_columns_and_dtypes_are_stable(jobs):
    frame = jobs_frame(jobs)

    assert list(frame.columns) == list(JOB_COLUMNS)
    assert frame.index.name == "index"
    assert list(frame.index) == [0, 1, 2, 3]
    dtypes = frame.dtypes
    for name in ("id", "args", "kwargs", "result", "provisional"):
        assert dtypes[name] == "object", name
    assert dtypes["status"] == STATUS_DTYPE
    for name in ("node", "node_name", "stdout", "stderr", "exception"):
        assert isinstance(dtypes[name], pd.StringDtype), name
    for name in ("submit_time", "start_time", "end_time"):
        assert dtypes[name] == pd.DatetimeTZDtype("ns", "UTC"), name
    assert dtypes["duration"] == "float64"


def test_jobs_frame_empty_has_the_same_columns_and_dtypes(jobs):
    empty, full = jobs_frame([]), jobs_frame(jobs)

    assert len(empty) == 0
    assert empty.dtypes.to_dict() == full.dtypes.to_dict()


def test_jobs_frame_rows_hold_each_job(jobs):
    frame = jobs_frame(jobs)
    done, failed, running, created = (frame.loc[i] for i in range(4))

    assert [job.id for job in jobs] == list(frame["id"])
    assert done["args"] == (2,) and done["kwargs"] == {}
    assert done["result"] == 4
    assert done["status"] == "Finished"
    assert done["node"] == "127.0.0.1"
    assert done["duration"] == pytest.approx(2.5)
    assert done["start_time"] == pd.Timestamp(1000.0, unit="s", tz="UTC")
    assert done["stdout"] == "two\n"
    assert pd.isna(done["exception"])
    assert failed["status"] == "Terminated"
    assert failed["exception"].endswith("ValueError: 3")
    assert failed["stderr"] == "raw \ufffd bytes"  # bytes decoded, never dropped
    assert running["status"] == "Running"
    assert pd.isna(running["end_time"]) and pd.isna(running["duration"])
    assert created["status"] == "Created"
    assert created["kwargs"] == {"scale": 2}
    assert pd.isna(created["node"]) and pd.isna(created["start_time"])


def test_jobs_frame_nodes_given_name_each_jobs_node_by_address_port_and_name(jobs):
    from dispynb.node import DispyNode

    nodes = [DispyNode("127.0.0.1", "local-1", 1, port=40331), None, None, None]
    frame = jobs_frame(jobs, nodes=nodes)

    assert frame.loc[0, "node"] == "127.0.0.1:40331"
    assert frame.loc[0, "node_name"] == "local-1"
    assert frame.loc[1, "node"] == "127.0.0.1"  # not known: its address
    assert pd.isna(frame.loc[1, "node_name"])
    six = jobs_frame(jobs[:1], nodes=[DispyNode("::1", "", 1, port=9711)])
    assert six.loc[0, "node"] == "[::1]:9711"  # as nodes_frame's index says it
    assert pd.isna(six.loc[0, "node_name"])
    with pytest.raises(ValueError, match="1 nodes given for 4 jobs"):
        jobs_frame(jobs, nodes=nodes[:1])


def test_jobs_frame_status_counts_include_every_status(jobs):
    counts = jobs_frame(jobs)["status"].value_counts()

    assert set(counts.index) == {s.name for s in JobStatus}
    assert counts["Finished"] == 1 and counts["Cancelled"] == 0


def test_jobs_frame_provisional_column_none_unless_given(jobs):
    assert list(jobs_frame(jobs)["provisional"]) == [None] * 4

    frame = jobs_frame(jobs, provisional=[None, None, (1, 2), {"step": 3}])

    assert frame.loc[2, "provisional"] == (1, 2)
    assert frame.loc[3, "provisional"] == {"step": 3}
    with pytest.raises(ValueError, match="2 provisional results given for 4 jobs"):
        jobs_frame(jobs, provisional=[1, 2])


def test_jobs_frame_tuple_results_stay_whole():
    frame = jobs_frame([make_job(1, status=JobStatus.Finished, result=(1, 2))])

    assert frame.loc[0, "result"] == (1, 2)


def test_jobs_frame_of_many_jobs_costs_pandas_no_more_than_of_a_few():
    """A run of many jobs gets its frame at once: each column is made whole, not
    set one value at a time (``run.df`` of 20,000 jobs took 2 s, of 100,000 some
    10 s, all of it in pandas' ``__setitem__``, five times per job)."""

    def pandas_calls(count: int) -> int:
        jobs = [
            make_job(i, status=JobStatus.Finished, result=(i, [i]), stdout="out\n")
            for i in range(count)
        ]
        calls = 0

        def profile(frame: Any, event: str, arg: Any) -> None:
            nonlocal calls
            if (
                event == "call"
                and f"{os.sep}pandas{os.sep}" in frame.f_code.co_filename
            ):
                calls += 1

        sys.setprofile(profile)
        try:
            frame = jobs_frame(jobs)
        finally:
            sys.setprofile(None)
        assert frame.loc[count - 1, "result"] == (count - 1, [count - 1])
        assert frame.loc[count - 1, "args"] == (count - 1,)
        return calls

    few, many = pandas_calls(20), pandas_calls(2000)
    assert many <= 2 * few, (few, many)


@dataclasses.dataclass
class Score:
    loss: float
    epochs: int


class Pair(NamedTuple):
    left: int
    right: int


def test_jobs_frame_expand_dict_results_become_columns_after_result():
    jobs = [
        make_job(1, status=JobStatus.Finished, result={"loss": 0.5, "epochs": 3}),
        make_job(2, status=JobStatus.Terminated, exception="x"),
        make_job(3, status=JobStatus.Finished, result={"loss": 0.25, "extra": "y"}),
    ]

    frame = jobs_frame(jobs, expand=True)

    columns = list(frame.columns)
    at = columns.index("result")
    assert columns[at + 1 : at + 4] == ["loss", "epochs", "extra"]
    assert frame["loss"].dtype == "float64"
    assert list(frame["loss"].fillna(-1)) == [0.5, -1, 0.25]
    assert frame.loc[2, "extra"] == "y"


def test_jobs_frame_expand_dataclass_and_namedtuple_results():
    jobs = [
        make_job(1, status=JobStatus.Finished, result=Score(0.1, 2)),
        make_job(2, status=JobStatus.Finished, result=Pair(3, 4)),
    ]

    frame = jobs_frame(jobs, expand=True)

    assert frame.loc[0, "loss"] == 0.1 and frame.loc[0, "epochs"] == 2
    assert frame.loc[1, "left"] == 3 and frame.loc[1, "right"] == 4


def test_expand_results_key_clashing_with_a_column_is_prefixed():
    jobs = [make_job(1, status=JobStatus.Finished, result={"status": "ok", "n": 1})]

    frame = expand_results(jobs_frame(jobs))

    assert frame.loc[0, "result.status"] == "ok"
    assert frame.loc[0, "status"] == "Finished"
    assert frame.loc[0, "n"] == 1


def test_expand_results_without_dict_results_changes_nothing(jobs):
    frame = jobs_frame(jobs)

    assert expand_results(frame) is frame


def test_nodes_frame_one_row_per_node():
    node = DispyNode("10.0.0.5", "n1", 4, port=9711, platform="Linux")
    node.busy, node.jobs_done, node.cpu_time = 2, 7, 1.5

    frame = nodes_frame([node])

    assert list(frame.index) == ["10.0.0.5:9711"]
    row = frame.loc["10.0.0.5:9711"]
    assert (row["name"], row["cpus"], row["busy"], row["jobs_done"]) == ("n1", 4, 2, 7)
    assert frame["cpus"].dtype == "int64"
