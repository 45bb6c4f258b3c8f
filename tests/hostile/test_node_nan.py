"""A node holding the secret reports a job's start and end times of NaN and
infinity. They reached the job and the web monitor's JSON as ``NaN`` (the node's
CPU time), which a browser's JSON.parse refuses: the monitor's page stopped
updating for everyone watching the cluster."""

from __future__ import annotations

import json
import math
import pickle
from typing import Any

import pytest

from dispynb import DispyJob, JobCluster
from dispynb.httpd import DispyHTTPServer
from dispynb.protocol.messages import JobResults, JobSubmit
from dispynb.transport.connection import Connection
from tests.hostile.scripted import ScriptedNode
from tests.httpd.client import MonitorClient
from tests.transport.util import SECRET, serving_in_thread

NAN, INF = float("nan"), float("inf")


def same(x: int) -> int:
    return x


class NanNode(ScriptedNode):
    """Ends each job with times of NaN and infinity (its start reported at NaN)."""

    async def jobs(self, conn: Connection, message: JobSubmit) -> None:
        for key, attempt, *_rest in message.jobs:
            entry = [key, attempt, "finished", NAN, INF, "", "", None, 1]
            results = JobResults(
                comp_id=message.comp_id,
                results=[entry],
                started=[[key, attempt, NAN, 0]],
            )
            conn.write(results, [pickle.dumps(7)])


def _strict(text: bytes) -> Any:
    """``text`` parsed as a browser's JSON.parse does: no NaN nor Infinity."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.attack(
    id="node-nan-figures",
    title="A node holding the secret ends a job with start and end times of NaN and "
    "infinity (its start reported at NaN)",
    goal="the job's times finite (or None), the web monitor's API answers JSON a "
    "browser parses (was: NaN in the node's CPU time and the job's times, which "
    "JSON.parse refuses)",
)
@pytest.mark.timeout(60)
def test_a_nodes_nan_figures_keep_the_monitor_json(measure) -> None:
    with (
        serving_in_thread(NanNode()) as port,
        JobCluster(same, nodes=[f"127.0.0.1:{port}"], secret=SECRET) as cluster,
    ):
        job = cluster.submit(7)
        assert job() == 7 and job.status == DispyJob.Finished
        server = DispyHTTPServer(cluster, port=0, poll_sec=1)
        try:
            reply = MonitorClient(server).get("/api/cluster")
        finally:
            server.shutdown(wait=False)
    times = [job.start_time, job.end_time]
    try:
        _strict(reply.body)
        parsed = "parsed"
    except ValueError as exc:
        parsed = str(exc)
    measure(f"job times {times}; /api/cluster: {parsed}")
    assert reply.status == 200
    assert all(t is None or math.isfinite(t) for t in times), times
    assert parsed == "parsed", reply.body[:600]
