"""Jobs and nodes as pandas DataFrames, built in one place with stable columns.

`jobs_frame` turns any iterable of `DispyJob` (from any cluster) into a DataFrame with
one row per job; `Run.df` and ``%%dispy`` runs use it. `nodes_frame` does the same for
`DispyNode`. Column names and dtypes are part of the API:

===========  ===================  ===========================================
column       dtype                meaning
===========  ===================  ===========================================
id           object               ``job.id``
args         object               positional arguments (a tuple)
kwargs       object               keyword arguments (a dict)
result       object               return value (``None`` if none yet; while the
                                  job runs, its latest provisional result)
provisional  object               latest provisional result (``None`` if none,
                                  or if not known: only a `Run` records them)
status       category             ``JobStatus`` name (`STATUS_DTYPE`)
node         string               the node that ran it: ``HOST:PORT`` (the index of
                                  `nodes_frame`) when known (a `Run`'s jobs), else
                                  its address; <NA> if it did not run
node_name    string               that node's name (``local-1``), or <NA> if not
                                  known (only a `Run` records them)
submit_time  datetime64[ns, UTC]  when the job was submitted
start_time   datetime64[ns, UTC]  when it started on the node, or NaT
end_time     datetime64[ns, UTC]  when it ended, or NaT
duration     float64              ``end_time - start_time`` (seconds), or NaN
stdout       string               what it printed ("" if nothing), or <NA>
stderr       string               what it wrote to stderr
exception    string               remote traceback if it failed, else <NA>
===========  ===================  ===========================================

The index is the job's position in the iterable (a ``RangeIndex`` named ``"index"``),
which for a run is the position of its input. ``expand=True`` adds one column per key
of dict results (dataclass and namedtuple results too) after ``result``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dispynb.job import DispyJob, JobStatus
from dispynb.transport.addressing import format_address

if TYPE_CHECKING:
    from dispynb.node import DispyNode

__all__ = [
    "JOB_COLUMNS",
    "NODE_COLUMNS",
    "STATUS_DTYPE",
    "expand_results",
    "jobs_frame",
    "nodes_frame",
]

#: The status column's dtype: every `JobStatus` name, in dispy's order.
STATUS_DTYPE = pd.CategoricalDtype([s.name for s in JobStatus], ordered=True)

_TIME = "datetime64[ns, UTC]"

#: Columns of `jobs_frame`, in order, with their dtypes.
JOB_COLUMNS: dict[str, Any] = {
    "id": "object",
    "args": "object",
    "kwargs": "object",
    "result": "object",
    "provisional": "object",
    "status": STATUS_DTYPE,
    "node": "string",
    "node_name": "string",
    "submit_time": _TIME,
    "start_time": _TIME,
    "end_time": _TIME,
    "duration": "float64",
    "stdout": "string",
    "stderr": "string",
    "exception": "string",
}

#: Columns of `nodes_frame`, in order, with their dtypes.
NODE_COLUMNS: dict[str, Any] = {
    "name": "string",
    "address": "string",
    "port": "int64",
    "cpus": "int64",
    "busy": "int64",
    "jobs_done": "int64",
    "cpu_time": "float64",
    "platform": "string",
}


def jobs_frame(
    jobs: Iterable[DispyJob],
    expand: bool = False,
    provisional: Sequence[Any] | None = None,
    nodes: Sequence[DispyNode | None] | None = None,
) -> pd.DataFrame:
    """One row per job; see the module docstring for the columns and dtypes.

    Parameters
    ----------
    jobs:
        Jobs of any cluster, finished or not; each row is a snapshot of the job now.
    expand:
        Add a column per key of dict (or dataclass, or namedtuple) results; see
        `expand_results`.
    provisional:
        The latest provisional result of each job, in the same order (`Run.df`
        gives them); default: ``None`` for all.
    nodes:
        The node each job ran on, in the same order, None where not known (`Run.df`
        gives them): the ``node`` column then tells apart nodes of one address, and
        ``node_name`` names them; default: the jobs' addresses only.

    Examples
    --------
    >>> jobs = [cluster.submit(i) for i in range(3)]  # doctest: +SKIP
    >>> cluster.wait()  # doctest: +SKIP
    >>> jobs_frame(jobs)[["result", "status", "duration"]]  # doctest: +SKIP
    """
    columns: dict[str, list[Any]] = {name: [] for name in JOB_COLUMNS}
    jobs = list(jobs)
    if provisional is None:
        provisional = [None] * len(jobs)
    elif len(provisional) != len(jobs):
        raise ValueError(
            f"{len(provisional)} provisional results given for {len(jobs)} jobs"
        )
    if nodes is None:
        nodes = [None] * len(jobs)
    elif len(nodes) != len(jobs):
        raise ValueError(f"{len(nodes)} nodes given for {len(jobs)} jobs")
    columns["provisional"] = list(provisional)
    for job, node in zip(jobs, nodes, strict=True):
        start, end = job.start_time, job.end_time
        columns["id"].append(job.id)
        columns["args"].append(getattr(job, "_args", ()))
        columns["kwargs"].append(getattr(job, "_kwargs", {}))
        columns["result"].append(job.result)
        columns["status"].append(_status_name(job.status))
        if node is None:
            columns["node"].append(job.ip_addr)
            columns["node_name"].append(None)
        else:
            columns["node"].append(format_address(node.ip_addr, node.port))
            columns["node_name"].append(node.name or None)
        columns["submit_time"].append(job.submit_time)
        columns["start_time"].append(start)
        columns["end_time"].append(end)
        columns["duration"].append(
            end - start if start is not None and end is not None else None
        )
        columns["stdout"].append(_text(job.stdout))
        columns["stderr"].append(_text(job.stderr))
        columns["exception"].append(job.exception)
    frame = pd.DataFrame(
        {name: _column(values, JOB_COLUMNS[name]) for name, values in columns.items()}
    )
    frame.index.name = "index"
    return expand_results(frame) if expand else frame


def expand_results(frame: pd.DataFrame, column: str = "result") -> pd.DataFrame:
    """Add a column per key of the dict-like values in ``frame[column]``.

    Dicts, dataclass instances and namedtuples are expanded; other values (and
    unfinished jobs) leave the new columns empty. New columns come right after
    ``column``, named by the keys; a key that clashes with an existing column is
    prefixed with ``"<column>."``. Their dtypes are inferred by pandas.
    """
    records = [_as_record(value) for value in frame[column]]
    keys: list[str] = []
    for record in records:
        for key in record or ():
            if key not in keys:
                keys.append(key)
    if not keys:
        return frame
    extra = pd.DataFrame.from_records(
        [record or {} for record in records], index=frame.index, columns=keys
    )
    extra = extra.infer_objects()
    extra.columns = pd.Index(
        [f"{column}.{key}" if key in frame.columns else key for key in keys]
    )
    at = frame.columns.get_loc(column)
    assert isinstance(at, int)
    return pd.concat([frame.iloc[:, : at + 1], extra, frame.iloc[:, at + 1 :]], axis=1)


def nodes_frame(nodes: Iterable[DispyNode]) -> pd.DataFrame:
    """One row per node (`NODE_COLUMNS`), indexed by ``"address:port"`` (an IPv6
    address in brackets), as `jobs_frame`'s ``node`` column names them."""
    rows = [
        (
            n.name,
            n.ip_addr,
            n.port,
            n.cpus,
            n.busy,
            n.jobs_done,
            n.cpu_time,
            n.platform,
        )
        for n in nodes
    ]
    frame = pd.DataFrame(rows, columns=list(NODE_COLUMNS))
    frame = frame.astype(NODE_COLUMNS)
    frame.index = pd.Index(
        [
            format_address(a, p)
            for a, p in zip(frame["address"], frame["port"], strict=True)
        ],
        name="node",
    )
    return frame


def _column(values: Sequence[Any], dtype: Any) -> pd.Series:
    if dtype == _TIME:
        seconds = pd.Series([float("nan") if v is None else v for v in values])
        return pd.to_datetime(seconds, unit="s", utc=True).astype(
            pd.DatetimeTZDtype("ns", "UTC")
        )
    if dtype == "object":
        # One value at a time into numpy (tuples and arrays stay whole, as they
        # are), then to pandas at once: pandas' own setitem per value took
        # seconds for a run of 20,000 jobs.
        array = np.empty(len(values), dtype=object)
        for i, value in enumerate(values):
            array[i] = value
        return pd.Series(array, dtype=object, copy=False)
    typed: pd.Series[Any] = pd.Series(list(values), dtype=dtype)
    return typed


def _status_name(status: Any) -> str:
    try:
        return JobStatus(status).name
    except ValueError:
        return str(status)


def _text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _as_record(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return dict(value._asdict())
    return None
