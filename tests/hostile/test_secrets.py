"""Attacks that fish for the shared secret: errors, logs, files of a real node."""

from __future__ import annotations

import logging

import pytest

from dispynb import JobCluster
from dispynb.errors import DispynbError
from tests import jobs
from tests.hostile.tools import limited_node, strong_secret

pytestmark = pytest.mark.slow


@pytest.mark.attack(
    id="secret-leak",
    title="Looking for the secret in a node's log, its files, and a client's errors",
    goal="neither the right secret nor a wrong guess appears anywhere",
)
def test_secret_never_appears_in_logs_errors_or_files(measure, tmp_path, caplog):
    secret, guess = strong_secret(), strong_secret()
    caplog.set_level(logging.DEBUG)
    with limited_node(tmp_path / "node", "--loglevel", "debug", secret=secret) as node:
        with (
            pytest.raises(DispynbError) as refused,
            JobCluster(jobs.square, nodes=[node.spec], secret=guess) as jc,
        ):
            jc.submit(3)()
        with JobCluster(jobs.square, nodes=[node.spec], secret=secret) as jc:
            assert jc.submit(3)() == 9
    texts = {
        "client error": str(refused.value) + repr(refused.value),
        "client log": "\n".join(r.getMessage() for r in caplog.records),
        "node log": node.log_text(),
    }
    for path in (tmp_path / "node").rglob("*"):
        if path.is_file() and path != node.secret_file:
            texts[str(path)] = path.read_text(errors="replace")
    leaks = [where for where, text in texts.items() if secret in text or guess in text]
    measure(f"searched {len(texts)} logs, errors and files: {len(leaks)} leaks")
    assert leaks == []
