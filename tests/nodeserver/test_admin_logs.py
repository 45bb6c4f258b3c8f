"""What a node's administrator reads in its log: its limits' refusals, named."""

from __future__ import annotations

import pytest

from dispynb import JobCluster
from dispynb.errors import SetupError
from tests.nodeproc import running_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


def nothing() -> int:
    return 0


def test_a_computation_refused_by_a_node_limit_is_logged_at_the_node(
    tmp_path, monkeypatch
):
    """A computation whose files pass --max-file-size or --transfer-quota was
    refused to its client only: the node's log said nothing, so its admin could
    not tell why users' clusters failed there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "big.bin").write_bytes(b"x" * 5000)
    (tmp_path / "mid.bin").write_bytes(b"y" * 3000)
    with running_node(
        tmp_path / "node", "--max-file-size", "4000", "--transfer-quota", "2000"
    ) as node:
        with pytest.raises(SetupError, match="maximum file size"):
            JobCluster(
                nothing, nodes=[node.spec], secret=node.secret, depends=["big.bin"]
            )
        with pytest.raises(SetupError, match="transfer quota"):
            JobCluster(
                nothing, nodes=[node.spec], secret=node.secret, depends=["mid.bin"]
            )
    refused = [
        line for line in node.log_text().splitlines() if "refused computation" in line
    ]
    assert len(refused) == 2, node.log_text()
    assert "WARNING" in refused[0]
    assert "'nothing'" in refused[0] and "--max-file-size" in refused[0]
    assert "'big.bin'" in refused[0] and "127.0.0.1" in refused[0]
    assert "--transfer-quota" in refused[1]
