"""A node whose file size limit (``ulimit -f``, RLIMIT_FSIZE: a batch system or a
shell's limit, which binds root too) is under a file its client sends.

The setup fails saying why; "File too large" alone read as the node's own
``--max-file-size``, or a full disk. A real node from the command line under
``prlimit --fsize``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dispynb import JobCluster
from dispynb.errors import SetupError
from tests.api.test_recovery_kept import kill_client_with_kept_results
from tests.jobs import wait_until
from tests.nodeproc import running_node, start_node

pytestmark = pytest.mark.slow


def square(n: int) -> int:
    return n * n


@pytest.mark.timeout(60)
def test_a_file_over_the_nodes_file_size_limit_names_that_limit(
    tmp_path: Path,
) -> None:
    depends = tmp_path / "data.bin"
    depends.write_bytes(os.urandom(2 << 20))
    limit = ["prlimit", "--fsize=1000000", "--"]
    with running_node(tmp_path / "node", launcher=limit) as node:
        with pytest.raises(SetupError) as raised:
            JobCluster(
                square, nodes=[node.spec], secret=node.secret, depends=[str(depends)]
            )
        with JobCluster(square, nodes=[node.spec], secret=node.secret) as cluster:
            assert cluster.submit(3)() == 9  # the node serves on
    text = str(raised.value)
    assert "cannot store a file of 2097152 bytes" in text, text
    assert "File too large (the node's file size limit, ulimit -f: have it" in text


@pytest.mark.timeout(90)
def test_a_kept_result_over_the_nodes_file_size_limit_names_that_limit(
    tmp_path: Path,
) -> None:
    """A client killed, its job's result (30 MiB) over the node's file size limit:
    the node keeps it in memory (its spool refused it) and says why. It said
    "File too large" alone, and, as the node stopped with it still unclaimed,
    advised freeing space in --dest-path: the disk had room."""
    limit = ["prlimit", "--fsize=20000000", "--"]
    node = start_node(tmp_path / "node", cpus=2, launcher=limit)
    try:
        kill_client_with_kept_results(tmp_path, node, [f"bytes:{30 << 20}", "int:3"])
        wait_until(lambda: "cannot spool a kept result" in node.log_text())
    finally:
        node.stop()
    log = node.log_text()
    limited = "File too large (the node's file size limit, ulimit -f)"
    assert f"{limited} (results of it that fail so" in log, log
    assert (
        f"its disk refused them: [Errno 27] {limited}; have the node's file size "
        "limit (ulimit -f) raised)"
    ) in log, log
