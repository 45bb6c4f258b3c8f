"""A node that has no memory for a message (an address space limit, strict
overcommit) refuses that message and serves on.

A real ``dispynb-node`` under ``prlimit --as``; an authenticated raw client
announces a message of 1 GiB (the node's default message limit), which the node
cannot map.
"""

from __future__ import annotations

import struct

import pytest

from dispynb import JobCluster
from dispynb.protocol.auth import MAC_SIZE
from dispynb.protocol.framing import PREFIX
from dispynb.protocol.messages import Error
from tests import jobs
from tests.hostile.tools import RawSession, count_lines
from tests.nodeproc import start_node

pytestmark = pytest.mark.slow

#: The node's address space: its own (about 110 MB) and some, not a 1 GiB message.
ADDRESS_SPACE = 1 << 30


@pytest.mark.attack(
    id="message-over-node-memory",
    title="An authenticated client sends a message of 1 GiB to a node whose address "
    "space is 1 GiB (prlimit --as)",
    goal="the client is told the node is out of memory for it, the node logs one "
    "line and serves on (was: a MemoryError traceback logged as an ERROR by "
    "asyncio, the connection reset without a word)",
)
def test_a_message_over_the_node_memory_is_refused_saying_so(measure, tmp_path):
    launcher = ["prlimit", f"--as={ADDRESS_SPACE}", "--"]
    node = start_node(tmp_path / "node", launcher=launcher, secret="a" * 43)
    try:
        session = RawSession.open(node.port, node.secret, timeout=20)
        try:
            body = (1 << 30) - 64
            head = PREFIX.pack(body, 1) + struct.pack("!I", body - 4 - MAC_SIZE)
            session.sock.sendall(head)
            answer = session.recv()
        finally:
            session.close()
        with JobCluster(jobs.square, nodes=[node.spec], secret=node.secret) as cluster:
            after = cluster.submit(4)()
    finally:
        node.stop()
    log = node.log_text()
    said = answer.message if isinstance(answer, Error) else repr(answer)
    lines = count_lines(node.log, "out of memory")
    measure(
        f"answered: {said[:110]}...; the node's log: {lines} line(s), "
        f"{log.count('Traceback')} tracebacks; next client's job: {after}"
    )
    assert isinstance(answer, Error) and "out of memory" in answer.message
    assert "Traceback" not in log and after == 16
