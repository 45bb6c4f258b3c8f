"""A client comes back to a node before the node noticed its first connection end
(a link cut, then healed: the node hears of the old connection last).

The client sets its computation up again with the same recovery id. When the node
then sees the old connection end, it must adopt (keep running for recovery) the
old computation, not the new one its client is using now. An in-process node
server, real client connections (`tests.inprocess`).
"""

from __future__ import annotations

from pathlib import Path

from dispynb.protocol.messages import ComputationReady, ComputationSetup, JobResults
from tests.asyncutil import run
from tests.inprocess import gate, in_process_node, wait_until
from tests.nodeserver.test_session import blocked, bundle, expect, submit

RECOVERY_ID = "late" * 8


def setup(comp_id: int) -> ComputationSetup:
    return ComputationSetup(
        comp_id=comp_id,
        name="test",
        workers=0,
        recovery_id=RECOVERY_ID,
        keep_results=3600.0,
    )


def test_the_old_connection_ending_last_leaves_the_new_computation_alone(
    tmp_path: Path,
) -> None:
    """Before, the node adopted the new computation as the gone client's: it
    started closing it under its live client (to end once its jobs had), and
    said in its log that this client was gone; the old computation, whose jobs
    the client had given up, ran on for nobody."""

    async def main() -> None:
        async with in_process_node(tmp_path, cpus=2) as node:
            old = await node.client()
            old.write(setup(1), bundle(blocked))
            await expect(old, ComputationReady)
            submit(old, (1, ("late-old",)))
            await wait_until(lambda: node.launcher.busy_workers(), "old job running")
            new = await node.client()  # the client is back, on a new connection
            new.write(setup(1), bundle(blocked))
            await expect(new, ComputationReady)
            kept = node.server.keeper.kept(RECOVERY_ID)
            assert kept is not None
            old.abort()  # the node hears of the first connection's end only now
            await wait_until(lambda: len(node.server.sessions) == 1, "old ended")
            gate("late-old").set()
            # The new computation serves its client, job after job.
            for key in (2, 3):
                name = f"late-new-{key}"
                submit(new, (key, (name,)))
                gate(name).set()
                results = await expect(new, JobResults)
                assert isinstance(results, JobResults)
            # Neither kept for a gone client nor closing under its live one.
            assert not kept.adopted
            assert kept.computation is not None and not kept.computation.closing
            new.close()

    run(main())
