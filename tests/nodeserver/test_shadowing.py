"""A computation's files named like the node's own modules (a ``msgpack.py``, a
``dispynb.py`` sent with ``depends``) shadow none of them, and its other modules
still import, whether its process is forked from the zygote or a new interpreter
(``python -P -m nodeserver.compute``, started in the computation's directory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispynb import DispyJob, JobCluster
from tests.nodeproc import running_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

#: The node's modules, as a user's file may be named too: each fails if imported.
SHADOWS = ("dispynb", "nodeserver", "msgpack", "cloudpickle")


def use_helper(x: int) -> tuple[int, str]:
    import sys

    import helper  # type: ignore[import-not-found]

    return helper.double(x), sys.path[0]


@pytest.mark.parametrize("zygote", ["1", "0"])
def test_files_sent_named_like_the_nodes_modules_shadow_none(
    tmp_path: Path, zygote: str
) -> None:
    sent = tmp_path / "sent"
    sent.mkdir()
    depends = []
    for module in SHADOWS:
        path = sent / f"{module}.py"
        path.write_text(f"raise SystemExit('the user\\'s {module}.py was imported')\n")
        depends.append(str(path))
    helper = sent / "helper.py"
    helper.write_text("def double(x):\n    return 2 * x\n")
    depends.append(str(helper))
    launcher = ["env", f"DISPYNB_ZYGOTE={zygote}"]
    with (
        running_node(tmp_path / "node", launcher=launcher) as node,
        JobCluster(
            use_helper, nodes=[node.spec], secret=node.secret, depends=depends
        ) as cluster,
    ):
        job = cluster.submit(21)
        result = job()
        assert job.status == DispyJob.Finished, (job.exception, node.log_text())
    value, first = result
    assert value == 42
    # The computation's directory, where the files sent are, leads the path.
    assert first.startswith(str(tmp_path / "node" / "dest")), first
