"""What jobs write below Python (``os.system``, a program they start, a C library)
shows in a real kernel as their prints do: with the run, labelled with its job,
not in whichever cell the notebook runs meanwhile."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.jupyter.kernel import kernel

pytestmark = pytest.mark.slow

NOWAIT_CELL = """\
%%dispy --over "range(2)" --into bg --nowait
def shell_out(i):
    import os, time
    deadline = time.monotonic() + 30
    while not os.path.exists(GATE) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.system(f"echo below-{i}")
    print(f"above-{i}")
    return i
"""

#: The cell run meanwhile: lets the jobs go, waits (printing nothing) till they end.
OTHER_CELL = """\
import time
open(GATE, "w").close()
deadline = time.monotonic() + 30
while bg.counts().finished < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
"""


def test_output_below_python_of_a_nowait_run_stays_with_its_run(
    tmp_path: Path,
) -> None:
    """It went to the kernel's own descriptors (the local node's are the kernel's),
    which ipykernel shows in the cell running then: another cell, unlabelled; and
    neither ``bg.df`` nor the run's output had it."""
    with kernel(tmp_path) as k:
        k.run_ok("%load_ext dispynb\n%dispy local --cpus 2")
        k.run_ok(f"GATE = {str(tmp_path / 'gate')!r}")
        k.run_ok(NOWAIT_CELL)
        other = k.run_ok(OTHER_CELL)
        after = k.run_ok("print(list(bg.df.stdout))")
        assert k.value("bg.counts().finished") == 2
    below = re.compile(r"^below-\d$", re.MULTILINE)
    assert not below.search(other.text), other.text
    assert not below.search(after.text), after.text
    assert after.stdout.strip() == str(["below-0\nabove-0\n", "below-1\nabove-1\n"])
