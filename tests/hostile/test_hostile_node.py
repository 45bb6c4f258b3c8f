"""A node that holds the secret but lies (issue 13 item 9).

A fake node (the real listener and handshake, then our own messages) sends a file
and a result for a job key the client never gave it, whose pickle would run code on
the client; and, for a job it was given, a result whose pickle would run code, which
``result_types`` refuses.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispynb import DispyJob, JobCluster
from dispynb.errors import DispynbError
from dispynb.protocol.messages import (
    ComputationReady,
    ComputationSetup,
    FileFromNode,
    FilePut,
    FilesMissing,
    JobResults,
    JobSubmit,
    ResultChunk,
)
from dispynb.transport.connection import Connection
from tests.hostile.scripted import ScriptedNode, finished
from tests.hostile.tools import wait_for
from tests.transport.util import SECRET, serving_in_thread


def square(x: int) -> int:
    return x * x


class _RunsCode:
    """Unpickling this makes a directory: the proof that the pickle ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (self.path,)


class LyingNode(ScriptedNode):
    """Answers a computation's jobs with foreign files and results, then ``reply``."""

    def __init__(self, marker: Path, reply: Any) -> None:
        super().__init__()
        self.marker = marker
        self.reply = reply
        self.ask_for: list[str] = []  # digests to ask for before the setup is done
        self.files_put: list[str] = []  # digests of the files the client sent

    def setup(self, conn: Connection, message: ComputationSetup) -> None:
        if self.ask_for:
            conn.write(FilesMissing(comp_id=message.comp_id, digests=self.ask_for))
        super().setup(conn, message)

    def other(self, conn: Connection, message: Any) -> None:
        if isinstance(message, FilePut):
            self.files_put.append(message.digest)

    async def jobs(self, conn: Connection, message: JobSubmit) -> None:
        comp_id = message.comp_id
        for key, attempt, *_rest in message.jobs:
            foreign = key + 1000  # never given to this node
            conn.write(
                FileFromNode(comp_id=comp_id, key=foreign, path="planted.txt"),
                [b"planted"],
            )
            # A chunk announcing a huge result for the foreign job: never allocated.
            chunk = ResultChunk(
                comp_id=comp_id, key=foreign, attempt=1, index=0, offset=0, size=1 << 40
            )
            conn.write(chunk, [b"x"])
            evil = pickle.dumps(_RunsCode(str(self.marker)))
            conn.write(
                JobResults(comp_id=comp_id, results=[finished(foreign, 1)]), [evil]
            )
            conn.write(
                JobResults(comp_id=comp_id, results=[finished(key, attempt)]),
                [pickle.dumps(self.reply)],
            )


@pytest.fixture
def lying_node(tmp_path) -> Iterator[tuple[int, LyingNode]]:
    """The lying node on a loop in a thread (the cluster's API is synchronous)."""
    marker = tmp_path / "code-ran"
    node = LyingNode(marker, reply=49)
    with serving_in_thread(node) as port:
        yield port, node


@pytest.mark.attack(
    id="foreign-job-results",
    title="A node holding the secret sends a file and a code-running result pickle "
    "for a job key it was never given",
    goal="neither is used: no file saved, the pickle never loaded",
)
def test_results_and_files_for_foreign_jobs_are_dropped(lying_node, tmp_path, measure):
    port, node = lying_node
    files_dir = tmp_path / "files"
    files_dir.mkdir()
    with JobCluster(
        square, nodes=[f"127.0.0.1:{port}"], secret=SECRET, files_dir=str(files_dir)
    ) as cluster:
        job = cluster.submit(7)
        assert job() == 49
    saved = sorted(p.name for p in files_dir.iterdir())
    measure(
        f"files saved: {saved or 'none'}; foreign pickle ran: {node.marker.exists()}"
    )
    assert saved == []
    assert not node.marker.exists()


@pytest.mark.attack(
    id="result-pickle-runs-code",
    title="A node returns, for a job it was given, a result whose pickle calls "
    "os.mkdir, to a client with result_types",
    goal="refused before any call; the job ends Terminated naming the global",
)
def test_result_types_refuses_a_pickle_that_runs_code(lying_node, tmp_path, measure):
    port, node = lying_node
    node.reply = _RunsCode(str(tmp_path / "reply-ran"))
    with JobCluster(
        square,
        nodes=[f"127.0.0.1:{port}"],
        secret=SECRET,
        result_types=["fractions.Fraction"],
    ) as cluster:
        job = cluster.submit(7)
        job()
    ran = (tmp_path / "reply-ran").exists()
    measure(f"pickle ran: {ran}; job {job.status.name}: {job.exception[:70]}")
    assert not ran
    assert job.status == DispyJob.Terminated
    assert "posix.mkdir" in job.exception and "result_types" in job.exception


@pytest.mark.attack(
    id="files-never-offered",
    title="A node holding the secret asks the client for files by digests the "
    "computation never offered (one of a file the client has, one garbage)",
    goal="nothing is read or sent; a warning, and the node's jobs go on",
)
def test_files_never_offered_are_not_sent(lying_node, tmp_path, measure, caplog):
    import hashlib

    port, node = lying_node
    secret_file = tmp_path / "not-offered.txt"
    secret_file.write_text("the client's, not the computation's")
    node.ask_for = [hashlib.sha256(secret_file.read_bytes()).hexdigest(), "zz" * 40]
    with JobCluster(square, nodes=[f"127.0.0.1:{port}"], secret=SECRET) as cluster:
        job = cluster.submit(7)
        assert job() == 49
    warned = any("never sent" in r.getMessage() for r in caplog.records)
    measure(
        f"files sent: {len(node.files_put)}; job {job.status.name}; warning: {warned}"
    )
    assert node.files_put == []
    assert job.status == DispyJob.Finished and warned


class MalformedNode(ScriptedNode):
    """Sends one message whose fields hold the wrong things inside (``bad``: its
    place, "setup" or "results"), a fuzzer's find."""

    def __init__(self, bad: str) -> None:
        super().__init__()
        self.bad = bad

    def setup(self, conn: Connection, message: ComputationSetup) -> None:
        if self.bad == "files-missing":
            conn.write(FilesMissing(comp_id=message.comp_id, digests=[[1]]))  # type: ignore[list-item]
        elif self.bad == "ready":
            conn.write(ComputationReady(comp_id=message.comp_id, workers=-1))
            return
        super().setup(conn, message)

    async def jobs(self, conn: Connection, message: JobSubmit) -> None:
        key, attempt = message.jobs[0][0], message.jobs[0][1]
        conn.write(
            JobResults(
                comp_id=message.comp_id,
                results=[finished(key, attempt)],
                started=[[{"a": 1}, attempt, 1.0, 0]],
            ),
            [pickle.dumps(key)],
        )


@pytest.mark.attack(
    id="malformed-from-node",
    title="A node holding the secret sends a files-missing whose digest is a list, a "
    "computation-ready with -1 workers, a job start whose key is a map",
    goal="the node dropped with a warning saying what is malformed; no traceback in "
    "the client's log (was: a TypeError or ValueError logged as an ERROR)",
)
@pytest.mark.parametrize("bad", ["files-missing", "ready", "results"])
def test_malformed_messages_from_a_node_drop_it_without_a_traceback(
    bad, caplog, measure
):
    node = MalformedNode(bad)
    with serving_in_thread(node) as port:
        try:
            cluster = JobCluster(square, nodes=[f"127.0.0.1:{port}"], secret=SECRET)
        except DispynbError as exc:  # its only node failed the setup
            said = str(exc)
        else:
            try:
                cluster.submit(7)
                wait_for(lambda: "left:" in caplog.text, "the node dropped")
            finally:
                cluster.close(terminate=True)
            said = next(r.getMessage() for r in caplog.records if "left:" in r.message)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    measure(f"{bad}: {said[:100]}; {len(errors)} errors logged")
    assert "malformed" in said or "-1 workers" in said, said
    assert not errors, errors
