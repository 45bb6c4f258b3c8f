"""A client that asks its node to hold its results until it acknowledges them as
journaled (`ComputationSetup.ack_journaled`) and never does.

The node holds unacknowledged results in memory for a while (the client journals
and acknowledges them within a round trip, normally) and writes the rest to its
spool: what it holds must stay bounded whatever the results carry (their output
too) and however many computations ask for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from pathlib import Path

import psutil
import pytest

from dispynb.protocol import serialize
from dispynb.protocol.messages import (
    ComputationClose,
    ComputationReady,
    ComputationSetup,
    JobResults,
    JobSubmit,
)
from tests.hostile.tools import WAIT, limited_node
from tests.nodeproc import CliNode
from tests.transport.util import RawClient

pytestmark = pytest.mark.slow

MiB = 1 << 20

#: A job printing n characters (defined here by value: the node cannot import
#: this module).
PRINTS = eval("lambda n: print('x' * n, end='')")
#: A job returning n bytes.
RETURNS = eval("lambda n: b'x' * n")


def kept_files(node_dir: Path) -> list[Path]:
    """The result files a node spooled for clients that may come back."""
    return list((node_dir / "dest" / ".kept").glob("*/r*"))


async def _never_acknowledging(
    node: CliNode, node_dir: Path, func: object, computations: int, jobs: int
) -> tuple[int, float]:
    """Set up ``computations`` computations asking to acknowledge journaled
    results, run ``jobs`` jobs ``func(MiB)`` on each, receive every result and
    acknowledge none; then, still connected, the results the node spooled and its
    RSS in MiB."""
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    client = RawClient(reader, writer)
    try:
        await client.handshake(node.secret.encode())
        bundle = serialize.dumps({"func": func, "setup": None, "setup_args": ()})
        for comp_id in range(1, computations + 1):
            setup = ComputationSetup(
                comp_id=comp_id,
                name=f"silent{comp_id}",
                workers=1,
                recovery_id=secrets.token_hex(16),
                keep_results=60,
                ack_journaled=True,
            )
            writer.write(client.signed_frame(setup, bundle))
        ready: list[ComputationReady] = []
        ended = 0
        async with asyncio.timeout(4 * WAIT):
            while len(ready) < computations:
                message, _ = await client.receive()
                if isinstance(message, ComputationReady):
                    ready.append(message)
            assert all(message.acks_journaled for message in ready), ready
            payload = serialize.dumps(((MiB,), {}))
            for comp_id in range(1, computations + 1):
                entries = [[key, 1, len(payload)] for key in range(jobs)]
                submit = JobSubmit(comp_id=comp_id, jobs=entries)
                writer.write(client.signed_frame(submit, list(payload) * jobs))
            while ended < computations * jobs:
                message, _ = await client.receive()
                if isinstance(message, JobResults):
                    ended += len(message.results)
            # A round trip: the node has recorded the last result (after sending
            # it) once it answers the close of a computation it does not have.
            writer.write(client.signed_frame(ComputationClose(comp_id=999)))
            while (await client.receive())[0].op in ("job-results", "node-status"):
                pass
        # Each result sent is held in memory or spooled (all of them once this
        # client is gone: not yet).
        rss = psutil.Process(node.proc.pid).memory_info().rss / MiB
        return len(kept_files(node_dir)), rss
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 10)


@pytest.mark.attack(
    id="unacknowledged-results",
    title="A client asks its node to hold its results until it acknowledges them "
    "as journaled (ack_journaled) and never does: 40 jobs printing 1 MiB each; five "
    "computations of 16 jobs returning 1 MiB each",
    goal="the node holds at most 16 MiB of them per computation, output counted, and "
    "64 MiB in all; it writes the others to its spool as it gets them (was: output "
    "not counted, all 40 held; 75 of 80)",
)
@pytest.mark.parametrize(
    ("func", "computations", "jobs", "held"),
    [(PRINTS, 1, 40, 16), (RETURNS, 5, 16, 64)],
    ids=["output", "computations"],
)
def test_a_client_that_never_acknowledges_cannot_fill_the_nodes_memory(
    measure, tmp_path, func, computations, jobs, held
):
    node_dir = tmp_path / "node"
    with limited_node(node_dir, cpus=2) as node:
        spooled, rss = asyncio.run(
            _never_acknowledging(node, node_dir, func, computations, jobs)
        )
    total = computations * jobs
    measure(
        f"{total - spooled} of {total} results of 1 MiB held in memory, {spooled} "
        f"spooled; node RSS {rss:.0f} MiB after"
    )
    # What was not spooled is held: 1 MiB and more each.
    assert total - spooled < held
