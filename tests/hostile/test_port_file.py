"""Another user plants a symlink where a node writes its port file.

A node (or scheduler) wrote ``--port-file PATH`` through ``PATH.tmp``, a fixed name
opened without ``O_EXCL``: with PATH in a directory others may write (``/tmp``),
a symlink planted there made the daemon write its port into any file its user may
write: as root, any file of the machine.
"""

from __future__ import annotations

import os

import pytest

from tests.nodeproc import start_node

pytestmark = pytest.mark.slow


@pytest.mark.attack(
    id="port-file-symlink",
    title="Another user plants PORT_FILE.tmp, a symlink to a file of the node's user, "
    "where the node writes its --port-file",
    goal="the file the symlink names is untouched; the port file is written (was: "
    "that file was overwritten with the port number)",
)
@pytest.mark.timeout(60)
def test_a_symlink_next_to_the_port_file_is_not_followed(tmp_path, measure) -> None:
    victim = tmp_path / "victim"
    victim.write_text("the user's data\n")
    directory = tmp_path / "node"
    directory.mkdir()
    os.symlink(victim, directory / "port.tmp")  # (start_node's --port-file: port)
    node = start_node(directory)
    try:
        port = (directory / "port").read_text().strip()
    finally:
        node.stop()
    kept = victim.read_text()
    measure(f"victim now {kept!r}; port file {port!r}; node port {node.port}")
    assert kept == "the user's data\n"
    assert port == str(node.port) and (directory / "port.tmp").is_symlink()
