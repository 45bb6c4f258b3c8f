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
from tests.nodeproc import running_node

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
