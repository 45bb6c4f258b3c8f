"""A client's ``dest_path`` naming thousands of directories under a real node's."""

from __future__ import annotations

import pytest

from dispynb import JobCluster, options
from dispynb.errors import SetupError
from tests import jobs
from tests.hostile.tools import limited_node

pytestmark = pytest.mark.slow


@pytest.mark.attack(
    id="dest-path-depth",
    title="A client sets up a computation whose dest_path names 3,000 directories",
    goal="its setup fails at once, saying why; the node serves on, nothing made "
    "(was: the node's start of it died in a RecursionError, logged as a task "
    "exception never retrieved, and its client waited for ever)",
)
def test_a_dest_path_too_deep_is_refused_saying_so(measure, tmp_path, monkeypatch):
    # A hostile client skips the check JobCluster makes: the node must refuse it.
    monkeypatch.setattr(options, "_check_dest_path", lambda value: value)
    with limited_node(tmp_path / "node") as node:
        with (
            pytest.raises(SetupError) as refused,
            JobCluster(
                jobs.square, nodes=[node.spec], secret=node.secret,
                dest_path="a/" * 3000,
            ) as cluster,
        ):  # fmt: skip
            job = cluster.submit(3)
            job.wait(timeout=20)  # (before: it never ended)
        with JobCluster(jobs.square, nodes=[node.spec], secret=node.secret) as cluster:
            after = cluster.submit(4)()
    made = (tmp_path / "node" / "dest" / "127.0.0.1").exists()
    measure(f"SetupError: {str(refused.value)[:110]}...; the next job: {after}")
    assert "names 3000 directories" in str(refused.value)
    assert after == 16 and not made
    assert "Traceback" not in node.log_text()
