"""An authenticated raw client announces a frame of 1000 MiB in 65,536 buffers:
its lengths table (256 KiB) is longer than the node's read chunk (64 KiB), and the
node took the whole body at the prefix, before any length was checked."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from dispynb import JobCluster
from dispynb.protocol.framing import MAX_BUFFERS, PREFIX
from tests import jobs
from tests.hostile.tools import RawSession, limited_node, wait_for

pytestmark = pytest.mark.slow

MiB = 1 << 20
ANNOUNCED = 1000 * MiB


def _vm_size(pid: int) -> int:
    """Process ``pid``'s address space now, bytes (VmSize)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1 << 16) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


@pytest.mark.attack(
    id="frame-table-over-chunk",
    title=f"An authenticated client announces a frame of {ANNOUNCED // MiB} MiB in "
    f"{MAX_BUFFERS:,} buffers, sends half its lengths table and waits; another "
    "sends lengths that pass the size",
    goal="nothing taken for the body before its lengths add up (was: +1000 MiB of "
    "the node's address space at the prefix); the second closed at once",
)
@pytest.mark.timeout(90)
def test_a_frame_of_many_buffers_takes_nothing_before_its_table(
    tmp_path: Path, measure
):
    with limited_node(tmp_path / "node") as node:
        pid = node.proc.pid
        waiting = RawSession.open(node.port, node.secret)
        liar = RawSession.open(node.port, node.secret)
        try:
            before = _vm_size(pid)
            head = PREFIX.pack(ANNOUNCED, MAX_BUFFERS)
            waiting.sock.sendall(head + bytes(2 * MAX_BUFFERS))  # half the table
            # The node serves on (and has read the half table meanwhile).
            with JobCluster(
                jobs.square, nodes=[node.spec], secret=node.secret
            ) as cluster:
                assert cluster.submit(3)() == 9
            grown = _vm_size(pid) - before
            measure(f"node address space +{grown / MiB:.0f} MiB with half a table in")
            assert grown < ANNOUNCED // 4, f"node +{grown / MiB:.0f} MiB"
            liar.sock.sendall(head + struct.pack("!2I", ANNOUNCED, 0))
            liar.sock.settimeout(0.5)
            took = wait_for(lambda: _closed(liar.sock), "the liar's connection closed")
            measure(f"lengths past the size: closed in {took:.2f} s")
        finally:
            waiting.close()
            liar.close()
