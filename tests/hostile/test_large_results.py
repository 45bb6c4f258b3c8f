"""A result just under the cap (issue 13 item 6): memory of node and client.

The node reads a result from its worker once and sends it on in chunks (views, no
copy); the client assembles each buffer in place (a ``bytes`` one in a BytesIO whose
memory becomes the result), so a result costs one copy on each side.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.nodeproc import ROOT, node_env

pytestmark = pytest.mark.slow

MiB = 1 << 20

#: A 512 MiB message cap leaves a result cap of 479 MiB (less room for the output).
MAX_MESSAGE_MIB = 512
SIZE_MIB = 470


def _transfer(kind: str) -> dict[str, object]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.hostile.large_result_client",
            kind,
            str(SIZE_MIB),
            str(MAX_MESSAGE_MIB),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=node_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def _growth(figures: dict[str, object], side: str) -> float:
    return (figures[f"{side}_peak"] - figures[f"{side}_before"]) / MiB  # type: ignore[operator]


@pytest.mark.attack(
    id="large-result",
    title=f"A job returns a {SIZE_MIB} MiB result (bytes, or bytearray), just under "
    "the result cap",
    goal="node and client each hold one copy (growth under 1.25x the result)",
)
@pytest.mark.parametrize("kind", ["bytes", "bytearray"])
@pytest.mark.timeout(180)
def test_a_result_under_the_cap_is_held_once_on_each_side(kind, measure):
    figures = _transfer(kind)
    node, client = _growth(figures, "node"), _growth(figures, "client")
    measure(f"{SIZE_MIB} MiB {kind}: node +{node:.0f} MiB, client +{client:.0f} MiB")
    assert figures["intact"], figures["exception"]
    assert node < 1.25 * SIZE_MIB
    assert client < 1.25 * SIZE_MIB
