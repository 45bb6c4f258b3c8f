"""A named node where nothing listens: the error says so in words (not the errno's
``Connect call failed ('127.0.0.1', 9711)``), and how to name a node started on
another port, the usual cause once the node is known to run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api.test_refused import run_script, traceback_of
from tests.ports import PortHolder

pytestmark = pytest.mark.slow


@pytest.mark.timeout(90)
def test_nothing_listening_names_the_port_and_how_to_name_another(
    tmp_path: Path, held_port: PortHolder
) -> None:
    port = held_port()  # nothing listens there
    done = run_script(tmp_path, f"127.0.0.1:{port}", "the-nodes-secret-4f9c2a7e1b")
    assert done.returncode == 1, done.stdout + done.stderr
    last = traceback_of(done.stderr)[-1]
    assert last == (
        "dispynb.errors.ConnectionClosedError: cannot connect to "
        f"127.0.0.1:{port}: nothing listens on port {port} there (connection "
        "refused; a node started with --port N is named '127.0.0.1:N'); is "
        "dispynb-node running there?"
    ), last
