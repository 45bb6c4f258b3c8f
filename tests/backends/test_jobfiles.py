"""Files jobs send (``dispy_send_file``) are saved by one helper on every engine,
`dispynb.backends.jobfiles.save_job_file`; here through dispynb's own nodes."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from dispynb import JobCluster, LocalCluster
from tests.jobs import WAIT

pytestmark = pytest.mark.slow


def send(name: str) -> int:
    os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
    with open(name, "w") as handle:
        handle.write(name)
    return dispy_send_file(name)  # type: ignore[name-defined]  # noqa: F821


def test_a_saved_file_is_logged_naming_its_job_and_node(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As on the Dask and Ray engines: the log names the job that sent the file
    (it named only the node), and a file that cannot be saved names both."""
    caplog.set_level(logging.DEBUG, logger="dispynb.backends.nodes")
    (tmp_path / "blocked").write_text("a file, not a folder")
    with (
        LocalCluster(cpus=1) as local,
        JobCluster(send, nodes=local, files_dir=str(tmp_path)) as cluster,
    ):
        job = cluster.submit("sent.txt")
        assert job.future.result(WAIT) == 0
        bad = cluster.submit("blocked/refused.txt")
        assert bad.future.result(WAIT) == -1
        node = job.ip_addr
    assert (tmp_path / "sent.txt").read_text() == "sent.txt"
    messages = [r.getMessage() for r in caplog.records if "sent" in r.getMessage()]
    messages += [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    # The cluster's number of the job (not job.id, which the program may set).
    sender = rf"job \d+ on node {re.escape(node)}:\d+"
    saved = re.escape(f"saved {tmp_path / 'sent.txt'} from ")
    assert re.fullmatch(saved + sender, messages[0]), messages
    assert re.match(f"file from {sender} not saved: ", messages[1]), messages
